// Drives tollgate with the official `openai` Node package, unchanged, pointed
// at it via baseURL. Run by tests/sdk_node.rs with TOLLGATE_BASE_URL and keys
// in the environment; the upstream behind tollgate is the project's mock.
import OpenAI, { AuthenticationError, PermissionDeniedError, RateLimitError } from "openai";

const env = process.env;
const baseURL = env.TOLLGATE_BASE_URL;
const client = new OpenAI({ baseURL, apiKey: env.TG_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "Say hello" }];
let passed = 0;
let failed = 0;

async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e?.constructor?.name}: ${e?.message}`);
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

async function expectError(cls, fn, code) {
  try {
    await fn();
  } catch (e) {
    assert(e instanceof cls, `expected ${cls.name}, got ${e?.constructor?.name}`);
    if (code) assert(e.code === code, `expected code ${code}, got ${e.code}`);
    return;
  }
  throw new Error(`no ${cls.name}`);
}

await check("chat_with_headers", async () => {
  const { data, response } = await client.chat.completions
    .create({ model: "gpt-4o-mini", messages }, { headers: { "x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "500" } })
    .withResponse();
  assert(data.choices[0].message.content === "Hello from the mock", JSON.stringify(data));
  assert(response.headers.get("x-tollgate-cost-usd") === "0.000450000", response.headers.get("x-tollgate-cost-usd"));
  assert(response.headers.get("x-tollgate-budget-remaining-usd") !== null, "no budget header");
});

await check("chat_stream", async () => {
  const stream = await client.chat.completions.create({ model: "gpt-4o", messages, stream: true });
  let text = "";
  let sawUsage = false;
  for await (const chunk of stream) {
    if (chunk.usage) sawUsage = true;
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert(text === "Hello from the mock", text);
  assert(!sawUsage, "usage chunk leaked to a client that did not ask");
});

await check("chat_stream_with_usage", async () => {
  const stream = await client.chat.completions.create({
    model: "gpt-4o",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let usage = null;
  for await (const chunk of stream) if (chunk.usage) usage = chunk.usage;
  assert(usage && usage.prompt_tokens === 10, JSON.stringify(usage));
});

await check("unknown_key_is_AuthenticationError", () =>
  expectError(AuthenticationError, () =>
    new OpenAI({ baseURL, apiKey: "tg-wrong", maxRetries: 0 }).chat.completions.create({ model: "gpt-4o", messages }),
  "invalid_api_key"),
);

await check("restricted_model_is_PermissionDeniedError", () =>
  expectError(PermissionDeniedError, () =>
    new OpenAI({ baseURL, apiKey: env.TG_KEY_RESTRICTED, maxRetries: 0 }).chat.completions.create({ model: "gpt-4o", messages }),
  "model_not_allowed"),
);

await check("budget_is_RateLimitError", () =>
  expectError(RateLimitError, () =>
    new OpenAI({ baseURL, apiKey: env.TG_KEY_BROKE, maxRetries: 0 }).chat.completions.create({ model: "gpt-4o", messages }),
  "budget_exceeded"),
);

const version = (await import("openai/version")).VERSION;
console.log(`openai-node ${version}: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
