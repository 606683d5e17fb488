//! The `tollgate` command line: parse arguments, load config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc malloc's arena locks were the largest user-space cost under load.
/// jemalloc removes them (+40% throughput) and, unlike mimalloc, keeps 1000
/// open streams under 64 MB (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use tollgate::budget::{BudgetStatus, Level, Period};
use tollgate::config::Config;
use tollgate::manage;
use tollgate::pricing::{litellm, Catalog, NanoUsd};
use tollgate::store::{ReportBy, Store};

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
    /// Exit 0 when the server of this config answers /healthz (for container health checks).
    Healthcheck {
        /// Base URL to check instead of the configured listen address.
        #[arg(long)]
        url: Option<String>,
    },
    /// Inspect, validate or import the model catalog.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Manage teams and their budgets.
    Teams {
        #[command(subcommand)]
        command: TeamsCommand,
    },
    /// Manage virtual API keys and their budgets.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Budgets of end users within a team (the OpenAI `user` field,
    /// Anthropic `metadata.user_id`, or header `x-tollgate-end-user`).
    EndUsers {
        #[command(subcommand)]
        command: EndUsersCommand,
    },
    /// Budgets of tags (header `x-tollgate-tags: a,b`).
    Tags {
        #[command(subcommand)]
        command: TagsCommand,
    },
    /// Every key, end-user and tag budget, with its spend this period.
    Budgets {
        #[command(subcommand)]
        command: BudgetsCommand,
    },
    /// The numbers every LLM developer should know, measured on this
    /// traffic: where a change would save money, and how much.
    Numbers {
        /// 24h, 7d, 30m, or a date (2026-11-01).
        #[arg(long, default_value = "30d")]
        since: String,
        /// One team's traffic only.
        #[arg(long)]
        team: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Usage and cost from the database.
    Report {
        #[arg(long, value_enum, default_value = "team")]
        by: ReportBy,
        /// 24h, 7d, 30m, or a date (2026-11-01).
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// Price every request again as this model (same tokens): what
        /// each team and model would have cost on it.
        #[arg(long)]
        shadow: Option<String>,
    },
}

/// A team's budget and output cap, as `teams create` and `teams set-budget` take them.
#[derive(clap::Args)]
struct BudgetArgs {
    /// USD per period; without it the team has no budget (set-budget clears it).
    #[arg(long)]
    budget_usd: Option<String>,
    /// Budget period [default: monthly when --budget-usd is given].
    #[arg(long, value_enum)]
    period: Option<Period>,
    /// Cap on output tokens per request, enforced on the way up (0 clears it).
    #[arg(long)]
    max_output_tokens: Option<u64>,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Create a team, optionally with a budget.
    Create {
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// List teams with their budgets.
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Set a team's rate limits (neither: clears them; 0 clears one).
    SetLimits {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set (or with no --budget-usd, clear) a team's budget.
    SetBudget {
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
    },
}

/// Rate limits, as `teams set-limits` and `keys set-limits` take them.
#[derive(clap::Args)]
struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute (prompt and output; admitted at the request's bound).
    #[arg(long)]
    tpm: Option<u64>,
}

/// A key's, end user's or tag's budget.
#[derive(clap::Args)]
struct LevelBudgetArgs {
    /// USD per period; without it the budget is cleared.
    #[arg(long)]
    budget_usd: Option<String>,
    /// Budget period [default: monthly when --budget-usd is given].
    #[arg(long, value_enum)]
    period: Option<Period>,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once, alone on the first line of stdout.
    Create {
        #[arg(long)]
        team: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated model globs the key may use (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// The key's own budget, USD per period (the team's applies too).
        #[arg(long)]
        budget_usd: Option<String>,
        /// The key budget's period [default: monthly].
        #[arg(long, value_enum)]
        period: Option<Period>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Set (or with no --budget-usd, clear) a key's budget.
    SetBudget {
        id: String,
        #[command(flatten)]
        budget: LevelBudgetArgs,
    },
    /// Set a key's rate limits (neither: clears them; 0 clears one).
    SetLimits {
        id: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Revoke a key by id; running servers refuse it within a second.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum EndUsersCommand {
    /// Set (or with no --budget-usd, clear) an end user's budget in a team.
    SetBudget {
        #[arg(long)]
        team: String,
        user: String,
        #[command(flatten)]
        budget: LevelBudgetArgs,
    },
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Set (or with no --budget-usd, clear) a tag's budget.
    SetBudget {
        tag: String,
        #[command(flatten)]
        budget: LevelBudgetArgs,
    },
}

#[derive(Subcommand)]
enum BudgetsCommand {
    /// List every key, end-user and tag budget (teams: `teams list`).
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Print the catalog in use (prices in USD per million tokens).
    Show {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Validate a catalog file (default: the one in use).
    Check { file: Option<PathBuf> },
    /// Models seen in usage that the catalog cannot price.
    Unpriced {
        /// 24h, 7d, 30m, or a date (2026-11-01).
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Convert LiteLLM's cost map JSON into catalog TOML.
    ImportLitellm {
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// LiteLLM provider whose models to keep.
        #[arg(long, default_value = "openai")]
        provider: String,
        /// Keep only models whose id matches one of these globs
        /// (comma-separated, e.g. `accounts/fireworks/models/llama-v3p*`).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // TOLLGATE_LOG, else RUST_LOG, else info; colour only on a terminal.
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            eprintln!(
                "migrations applied to {}",
                tollgate::store::describe_url(&config.database.url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            let base = url.unwrap_or_else(|| {
                let listen = config
                    .server
                    .listen
                    .replace("0.0.0.0", "127.0.0.1")
                    .replace("[::]", "[::1]");
                format!("http://{listen}")
            });
            let ok = runtime()?.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()?;
                let resp = client
                    .get(format!("{}/healthz", base.trim_end_matches('/')))
                    .send()
                    .await?;
                anyhow::Ok(resp.status().is_success())
            })?;
            if ok {
                println!("healthy");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("unhealthy");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Catalog { command } => catalog(command, &config),
        Command::Teams { command } => runtime()?.block_on(teams(command, &config)),
        Command::Keys { command } => runtime()?.block_on(keys(command, &config)),
        Command::EndUsers {
            command: EndUsersCommand::SetBudget { team, user, budget },
        } => runtime()?.block_on(set_level_budget(
            &config,
            Level::EndUser,
            Some(&team),
            &user,
            budget,
        )),
        Command::Tags {
            command: TagsCommand::SetBudget { tag, budget },
        } => runtime()?.block_on(set_level_budget(&config, Level::Tag, None, &tag, budget)),
        Command::Budgets {
            command: BudgetsCommand::List { format },
        } => runtime()?.block_on(list_level_budgets(&config, format)),
        Command::Numbers {
            since,
            team,
            format,
        } => runtime()?.block_on(numbers(&since, team.as_deref(), format, &config)),
        Command::Report {
            since,
            format,
            shadow: Some(shadow),
            ..
        } => runtime()?.block_on(shadow_report(&shadow, &since, format, &config)),
        Command::Report {
            by, since, format, ..
        } => runtime()?.block_on(report(by, &since, format, &config)),
    }
}

/// The database of a management command. Only `teams create` (the first
/// step of a setup) may create it; every other command run in the wrong
/// directory gets an error naming the file, not a stray empty database.
async fn open_store(config: &Config, create: bool) -> anyhow::Result<Store> {
    let url = &config.database.url;
    Ok(if create {
        Store::open(url).await?
    } else {
        Store::open_existing(url).await?
    })
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

async fn teams(command: TeamsCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let store = open_store(config, matches!(command, TeamsCommand::Create { .. })).await?;
    match command {
        TeamsCommand::Create { name, budget: args } => {
            manage::valid_team_name(&name)?;
            let budget = manage::budget_from(args.budget_usd.as_deref(), args.period)?;
            let cap = args.max_output_tokens.filter(|&m| m > 0);
            let team = store.create_team(&name, budget, cap).await?;
            match args.format {
                OutputFormat::Json => print_json(&manage::team_json(&team, None)),
                OutputFormat::Table => println!("created team {}", team.name),
            }
        }
        TeamsCommand::List { format } => {
            let teams = store.teams().await?;
            let spent = |t: &tollgate::store::TeamRow| {
                let store = store.clone();
                let t = t.clone();
                async move {
                    match t.budget {
                        Some(b) => {
                            let spent = store
                                .spend_since(&t.name, b.period.start(chrono::Utc::now()))
                                .await?;
                            anyhow::Ok(Some(tollgate::budget::BudgetStatus {
                                limit: b.limit,
                                spent: NanoUsd(spent),
                                reserved: NanoUsd(0),
                                remaining: NanoUsd(b.limit.0.saturating_sub(spent)),
                            }))
                        }
                        None => Ok(None),
                    }
                }
            };
            let mut rows = Vec::new();
            for t in &teams {
                rows.push((t, spent(t).await?));
            }
            match format {
                OutputFormat::Json => print_json(&serde_json::Value::Array(
                    rows.iter().map(|(t, s)| manage::team_json(t, *s)).collect(),
                )),
                OutputFormat::Table => {
                    println!(
                        "{:<24} {:>16} {:<8} {:>16} {:>12}",
                        "team", "budget_usd", "period", "spent_usd", "max_output"
                    );
                    for (t, s) in rows {
                        println!(
                            "{:<24} {:>16} {:<8} {:>16} {:>12}",
                            t.name,
                            t.budget.map_or("-".into(), |b| b.limit.to_string()),
                            t.budget.map_or("-", |b| b.period.as_str()),
                            s.map_or("-".into(), |s| s.spent.to_string()),
                            t.max_output_tokens.map_or("-".into(), |m| m.to_string()),
                        );
                    }
                }
            }
        }
        TeamsCommand::SetLimits { name, limits } => {
            let account = manage::level_account(&store, Level::Team, None, &name).await?;
            set_limits(&store, &account, limits).await?;
        }
        TeamsCommand::SetBudget { name, budget: args } => {
            let budget = manage::budget_from(args.budget_usd.as_deref(), args.period)?;
            let cap = args.max_output_tokens.map(|m| (m > 0).then_some(m));
            let team = store.set_budget(&name, budget, cap).await?;
            match args.format {
                OutputFormat::Json => print_json(&manage::team_json(&team, None)),
                OutputFormat::Table => println!(
                    "team {}: budget {}",
                    team.name,
                    team.budget.map_or("none".into(), |b| format!(
                        "${} {}",
                        b.limit,
                        b.period.as_str()
                    ))
                ),
            }
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `teams set-limits`, `keys set-limits`: a running server applies them
/// within its 500 ms refresh.
async fn set_limits(store: &Store, account: &str, args: LimitArgs) -> anyhow::Result<()> {
    let limits = tollgate::period::Limits {
        rpm: args.rpm.filter(|&n| n > 0),
        tpm: args.tpm.filter(|&n| n > 0),
    };
    store.set_rate_limits(account, limits).await?;
    let (level, name) = tollgate::budget::level_of(account);
    let text = |n: Option<u64>| n.map_or("none".to_string(), |n| n.to_string());
    println!(
        "{} {name}: rpm {}, tpm {}",
        level.as_str(),
        text(limits.rpm),
        text(limits.tpm)
    );
    Ok(())
}

/// `keys set-budget`, `end-users set-budget`, `tags set-budget`.
async fn set_level_budget(
    config: &Config,
    level: Level,
    team: Option<&str>,
    name: &str,
    args: LevelBudgetArgs,
) -> anyhow::Result<ExitCode> {
    let store = open_store(config, false).await?;
    let budget = manage::budget_from(args.budget_usd.as_deref(), args.period)?;
    let account = manage::level_account(&store, level, team, name).await?;
    let had_none = !store.set_level_budget(&account, budget).await? && budget.is_none();
    store.close().await;
    let who = match team {
        Some(t) => format!("{} {name} of team {t}", level.as_str()),
        None => format!("{} {name}", level.as_str()),
    };
    match (args.format, budget) {
        (OutputFormat::Json, Some(b)) => print_json(&manage::level_budget_json(&account, b, None)),
        (OutputFormat::Json, None) => print_json(&serde_json::json!({
            "level": level.as_str(), "name": name, "team": team, "budget_usd": null
        })),
        (OutputFormat::Table, Some(b)) => {
            println!("{who}: budget ${} {}", b.limit, b.period.as_str())
        }
        (OutputFormat::Table, None) if had_none => println!("{who}: had no budget"),
        (OutputFormat::Table, None) => println!("{who}: budget cleared"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `budgets list`: spend this period read from the usage rows.
async fn list_level_budgets(config: &Config, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let store = open_store(config, false).await?;
    let now = chrono::Utc::now();
    let mut rows = Vec::new();
    for (account, budget) in store.level_budgets().await? {
        let spent = store
            .account_spend_since(&account, budget.period.start(now))
            .await?;
        let status = BudgetStatus {
            limit: budget.limit,
            spent: NanoUsd(spent),
            reserved: NanoUsd(0),
            remaining: NanoUsd(budget.limit.0.saturating_sub(spent)),
        };
        rows.push(manage::level_budget_json(&account, budget, Some(status)));
    }
    store.close().await;
    match format {
        OutputFormat::Json => print_json(&serde_json::Value::Array(rows)),
        OutputFormat::Table => {
            println!(
                "{:<9} {:<24} {:<16} {:>14} {:<8} {:>14}",
                "level", "name", "team", "budget_usd", "period", "spent_usd"
            );
            for r in rows {
                let text = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<9} {:<24} {:<16} {:>14} {:<8} {:>14}",
                    text("level"),
                    text("name"),
                    text("team"),
                    text("budget_usd"),
                    text("period"),
                    text("spent_usd")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn keys(command: KeysCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let store = open_store(config, false).await?;
    match command {
        KeysCommand::SetBudget { id, budget } => {
            store.close().await;
            return set_level_budget(config, Level::Key, None, &id, budget).await;
        }
        KeysCommand::SetLimits { id, limits } => {
            let account = manage::level_account(&store, Level::Key, None, &id).await?;
            set_limits(&store, &account, limits).await?;
        }
        KeysCommand::Create {
            team,
            name,
            models,
            budget_usd,
            period,
            format,
        } => {
            let budget = manage::budget_from(budget_usd.as_deref(), period)?;
            let (row, secret) = manage::create_key(&store, &team, name, models).await?;
            if let Some(budget) = budget {
                let account = tollgate::budget::account(Level::Key, &row.id);
                store.set_level_budget(&account, Some(budget)).await?;
            }
            match format {
                OutputFormat::Json => {
                    print_json(&serde_json::json!({"id": row.id, "key": secret, "team": row.team}))
                }
                OutputFormat::Table => {
                    println!("{secret}");
                    eprintln!(
                        "key {} for team {} (shown once; store it now)",
                        row.id, row.team
                    );
                }
            }
        }
        KeysCommand::List { format } => {
            let keys = store.keys().await?;
            match format {
                OutputFormat::Json => print_json(&serde_json::Value::Array(
                    keys.iter().map(manage::key_json).collect(),
                )),
                OutputFormat::Table => {
                    println!(
                        "{:<22} {:<20} {:<20} {:<14} {:<24} {:<10}",
                        "id", "team", "name", "prefix", "models", "status"
                    );
                    for k in keys {
                        println!(
                            "{:<22} {:<20} {:<20} {:<14} {:<24} {:<10}",
                            k.id,
                            k.team,
                            k.name.as_deref().unwrap_or("-"),
                            k.prefix,
                            if k.models.is_empty() {
                                "*".to_string()
                            } else {
                                k.models.join(",")
                            },
                            if k.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "active"
                            },
                        );
                    }
                }
            }
        }
        KeysCommand::Revoke { id } => {
            store.revoke_key(&id).await?;
            println!("revoked {id}");
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn report(
    by: ReportBy,
    since: &str,
    format: ReportFormat,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let since = manage::parse_since(since, chrono::Utc::now())?;
    let store = open_store(config, false).await?;
    let rows = store.report(by, since).await?;
    match format {
        ReportFormat::Json => print_json(&manage::report_json(by, &rows)),
        ReportFormat::Csv => print!("{}", manage::report_text(&rows, true)),
        ReportFormat::Table => print!("{}", manage::report_text(&rows, false)),
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The catalog in use and every usage row since `since` (`24h`, a date).
async fn counts_since(
    since: &str,
    config: &Config,
) -> anyhow::Result<(Catalog, Vec<tollgate::store::CountsRow>)> {
    let since = manage::parse_since(since, chrono::Utc::now())?;
    let catalog = tollgate::server::load_catalog(config)?;
    let store = open_store(config, false).await?;
    let rows = store.counts_since(since).await;
    store.close().await;
    Ok((catalog, rows?))
}

/// `numbers`: see `tollgate::numbers`.
async fn numbers(
    since: &str,
    team: Option<&str>,
    format: OutputFormat,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let (catalog, rows) = counts_since(since, config).await?;
    let store = open_store(config, false).await?;
    let words = store
        .word_counts_since(manage::parse_since(since, chrono::Utc::now())?, team)
        .await;
    store.close().await;
    let numbers = tollgate::numbers::compute(&rows, team, &words?, &catalog);
    match format {
        OutputFormat::Json => print_json(&numbers),
        OutputFormat::Table => print!("{}", tollgate::numbers::text(&numbers)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `report --shadow MODEL`: every request since `since` priced again as
/// MODEL, by team and model, next to what it cost.
async fn shadow_report(
    shadow: &str,
    since: &str,
    format: ReportFormat,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let (catalog, rows) = counts_since(since, config).await?;
    let lines = manage::shadow_report(&rows, &catalog, shadow).map_err(anyhow::Error::msg)?;
    match format {
        ReportFormat::Json => print_json(&manage::shadow_json(shadow, &lines)),
        ReportFormat::Csv => print!("{}", manage::shadow_text(shadow, &lines, true)),
        ReportFormat::Table => print!("{}", manage::shadow_text(shadow, &lines, false)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `catalog unpriced`: models in the usage table the catalog in use cannot
/// price, with how many requests each had (recorded at $0, or refused).
async fn unpriced(since: &str, format: OutputFormat, config: &Config) -> anyhow::Result<ExitCode> {
    let since = manage::parse_since(since, chrono::Utc::now())?;
    let catalog = tollgate::server::load_catalog(config)?;
    let store = open_store(config, false).await?;
    let rows = store.report(ReportBy::Model, since).await?;
    store.close().await;
    let unpriced: Vec<_> = rows
        .iter()
        .filter(|r| !r.group.is_empty() && catalog.resolve(&r.group).price.is_none())
        .collect();
    match format {
        OutputFormat::Json => print_json(&serde_json::Value::Array(
            unpriced
                .iter()
                .map(|r| serde_json::json!({"model": r.group, "requests": r.requests}))
                .collect(),
        )),
        OutputFormat::Table => {
            println!("{:<48} {:>9}", "model", "requests");
            for r in &unpriced {
                println!("{:<48} {:>9}", r.group, r.requests);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn catalog(command: CatalogCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        CatalogCommand::Unpriced { since, format } => {
            runtime()?.block_on(unpriced(&since, format, config))
        }
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
            only,
        } => {
            let json = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let only: Vec<tollgate::glob::Glob> =
                only.iter().map(|g| tollgate::glob::Glob::new(g)).collect();
            let imported = litellm::import(&json, &provider, &only)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            // The output must load as a catalog; refuse to write one that does not.
            Catalog::parse(&imported.toml, config.catalog.finetune_multiple)
                .map_err(|e| anyhow::anyhow!("converted catalog does not load: {e}"))?;
            match out {
                Some(path) => std::fs::write(&path, &imported.toml)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                None => print!("{}", imported.toml),
            }
            for p in &imported.problems {
                eprintln!("skipped {p}");
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
                .map(|(id, p)| (id.to_string(), p.to_json()))
                .collect();
            let fees: serde_json::Map<String, serde_json::Value> = catalog
                .tool_call_fees()
                .iter()
                .map(|(k, f)| (k.clone(), f.usd_per_1000_string().into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({ "models": models, "tool_calls_usd_per_1000": fees })
            );
        }
        OutputFormat::Table => {
            use tollgate::pricing::Meter;
            println!(
                "{:<34} {:>10} {:>10} {:>10} {:>10}  {:<10} {:<24} {:<11} units",
                "model",
                "input/M",
                "output/M",
                "cached/M",
                "max_out",
                "provider",
                "tiers",
                "encoding"
            );
            for (id, p) in rows {
                println!(
                    "{:<34} {:>10} {:>10} {:>10} {:>10}  {:<10} {:<24} {:<11} {}",
                    id,
                    p.input().usd_per_million_string(),
                    p.output().usd_per_million_string(),
                    p.rates
                        .get(Meter::CachedInput)
                        .map_or("-".to_string(), |r| r.usd_per_million_string()),
                    p.max_output_tokens
                        .map_or("-".to_string(), |m| m.to_string()),
                    p.provider.unwrap_or("-"),
                    p.tier_names(),
                    p.encoding.map_or("-", |e| e.name()),
                    p.unit_prices(),
                );
            }
        }
    }
}
