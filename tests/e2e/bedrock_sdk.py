"""boto3's `bedrock-runtime` client against tollgate, `endpoint_url` pointed
at it and a tollgate key as its Bedrock API key (run by tests/bedrock.rs).
Prints one line per call: what the client saw.

botocore sends a bearer token over HTTPS only, so tollgate is reached here
through a TLS terminator, as it would be behind a load balancer in
production: a self-signed certificate (openssl) and a thread per
connection copying bytes both ways."""
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
USAGE = {
    "x-mock-prompt-tokens": "1000",
    "x-mock-cached-tokens": "2000",
    "x-mock-cache-write-5m": "400",
    "x-mock-completion-tokens": "200",
}
MESSAGES = [{"role": "user", "content": [{"text": "Hello, Bedrock"}]}]


def tls_terminator(target):
    """An https:// address on loopback forwarding to `target` (host, port),
    and the certificate to trust."""
    tmp = tempfile.mkdtemp()
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        while True:
            raw, _ = listener.accept()
            try:
                client = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            upstream = socket.create_connection(target)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"https://127.0.0.1:{listener.getsockname()[1]}", cert


tollgate = urlparse(os.environ["TOLLGATE_ENDPOINT"])
ENDPOINT, CERT = tls_terminator((tollgate.hostname, tollgate.port))


def client(key, headers=None):
    os.environ["AWS_BEARER_TOKEN_BEDROCK"] = key
    c = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=ENDPOINT,
        verify=CERT,
        config=Config(retries={"total_max_attempts": 1}),
    )

    def add_headers(request, **_):
        for k, v in (headers or {}).items():
            request.headers[k] = v

    c.meta.events.register("before-send.bedrock-runtime.*", add_headers)
    return c


app = client(os.environ["TG_KEY"], USAGE)
r = app.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 1024})
u = r["usage"]
print(
    "converse",
    r["output"]["message"]["content"][0]["text"],
    u["inputTokens"],
    u["cacheReadInputTokens"],
    u["cacheWriteInputTokens"],
    u["outputTokens"],
)

text, output = "", None
for event in app.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"]:
    if "contentBlockDelta" in event:
        text += event["contentBlockDelta"]["delta"]["text"]
    if "metadata" in event:
        output = event["metadata"]["usage"]["outputTokens"]
print("converse_stream", text, output)

body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, Claude"}]}
r = app.invoke_model(modelId=MODEL, body=json.dumps(body))
answer = json.loads(r["body"].read())
print("invoke_model", answer["content"][0]["text"], answer["usage"]["input_tokens"])

broke = client(os.environ["TG_KEY_BROKE"])
try:
    broke.converse(modelId=MODEL, messages=MESSAGES)
    print("broke allowed")
except ClientError as e:
    print("broke", e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])

wrong = client("tg-wrong")
try:
    wrong.converse(modelId=MODEL, messages=MESSAGES)
    print("wrong key allowed")
except ClientError as e:
    print("wrong key", e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
