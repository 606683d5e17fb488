//! The `tollgate` command line: parse arguments, load config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tollgate::config::Config;
use tollgate::pricing::{litellm, Catalog};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "OpenAI-compatible cost-tracking reverse proxy"
)]
struct Cli {
    /// Config file (default: $TOLLGATE_CONFIG, else ./tollgate.toml, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Inspect, validate or import the model catalog.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Print the catalog in use (prices in USD per million tokens).
    Show {
        #[arg(long, default_value = "table")]
        format: OutputFormat,
    },
    /// Validate a catalog file (default: the one in use).
    Check { file: Option<PathBuf> },
    /// Convert LiteLLM's cost map JSON into catalog TOML.
    ImportLitellm {
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// LiteLLM provider whose models to keep.
        #[arg(long, default_value = "openai")]
        provider: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            runtime()?.block_on(tollgate::server::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            runtime()?.block_on(async {
                let store = tollgate::store::Store::open(&config.database.url).await?;
                store.close().await;
                anyhow::Ok(())
            })?;
            eprintln!("migrations applied to {}", config.database.url);
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog { command } => catalog(command, &config),
    }
}

fn catalog(command: CatalogCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        CatalogCommand::Show { format } => {
            let catalog = tollgate::server::load_catalog(config)?;
            print_catalog(&catalog, format);
            Ok(ExitCode::SUCCESS)
        }
        CatalogCommand::Check { file } => {
            let (name, catalog) = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let catalog = Catalog::parse(&text, config.catalog.finetune_multiple)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    (path.display().to_string(), catalog)
                }
                None => (
                    "catalog in use".to_string(),
                    tollgate::server::load_catalog(config)?,
                ),
            };
            let problems = catalog.problems();
            for p in &problems {
                eprintln!("{name}: {p}");
            }
            if problems.is_empty() {
                println!("{name}: ok, {} models", catalog.len());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{name}: {} problem(s)", problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
        CatalogCommand::ImportLitellm {
            file,
            out,
            provider,
        } => {
            let json = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let imported = litellm::import(&json, &provider)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            // The output must load as a catalog; refuse to write one that does not.
            Catalog::parse(&imported.toml, config.catalog.finetune_multiple)
                .map_err(|e| anyhow::anyhow!("converted catalog does not load: {e}"))?;
            match out {
                Some(path) => std::fs::write(&path, &imported.toml)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                None => print!("{}", imported.toml),
            }
            eprintln!(
                "imported {} {provider} models ({} entries skipped)",
                imported.models, imported.skipped
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_catalog(catalog: &Catalog, format: OutputFormat) {
    let rows = catalog.rows();
    match format {
        OutputFormat::Json => {
            let models: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .map(|(id, p)| {
                    let v = serde_json::json!({
                        "input_usd_per_million": p.input.usd_per_million_string(),
                        "output_usd_per_million": p.output.usd_per_million_string(),
                        "cached_input_usd_per_million": p.cached_input.map(|r| r.usd_per_million_string()),
                        "max_output_tokens": p.max_output_tokens,
                        "encoding": p.encoding.map(|e| e.name()),
                    });
                    (id.to_string(), v)
                })
                .collect();
            println!("{}", serde_json::json!({ "models": models }));
        }
        OutputFormat::Table => {
            println!(
                "{:<34} {:>10} {:>10} {:>10} {:>10}  encoding",
                "model", "input/M", "output/M", "cached/M", "max_out"
            );
            for (id, p) in rows {
                println!(
                    "{:<34} {:>10} {:>10} {:>10} {:>10}  {}",
                    id,
                    p.input.usd_per_million_string(),
                    p.output.usd_per_million_string(),
                    p.cached_input
                        .map_or("-".to_string(), |r| r.usd_per_million_string()),
                    p.max_output_tokens
                        .map_or("-".to_string(), |m| m.to_string()),
                    p.encoding.map_or("-", |e| e.name()),
                );
            }
        }
    }
}
