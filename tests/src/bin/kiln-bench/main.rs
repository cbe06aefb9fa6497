//! `kiln-bench`: how fast a real Kiln farm moves stages, in four modes.
//!
//! - `--mode simulated` (default, [`simulated`]): a real coordinator and
//!   simulated agents that finish every stage at once — the engine's
//!   dispatch throughput and latency. Prints `dispatch stages_per_s=..`.
//! - `--mode agents` ([`agents`]): a real coordinator and `--agents W` real
//!   `kiln-agent --executor process` processes running `--runs N` one-stage
//!   runs of `true` submitted at once. Prints `agents runs_per_s=..`.
//! - `--mode read-load` ([`read_load`]): the agents mode twice in one
//!   farm, alone and while 5 clients read a 50 MiB stage log in a loop.
//!   Prints `read-load runs_per_s_without=.. runs_per_s_with=.. rss_mb=..`.
//! - `--mode web-followers` ([`web_followers`]): the agents mode twice in
//!   one farm, alone and while 100 dashboard clients follow a live stage
//!   log over Server-Sent Events. Prints `web-followers
//!   runs_per_s_without=.. runs_per_s_with=.. cost_pct=..`.
//!
//! Each mode logs its progress on stderr and ends with its one summary line
//! on stdout. The binaries it starts come from the same target directory
//! (`kiln-coordinator`, `kiln-agent`, and `kiln`, which creates the agent
//! token), so build those in the same profile first.

mod agents;
mod args;
mod read_load;
mod simulated;
mod stats;
mod web_followers;

use anyhow::{Result, bail};

use args::Args;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::from_env();
    match args.text("--mode", "simulated").as_str() {
        "simulated" => simulated::run(&args).await,
        "agents" => agents::run(&args).await,
        "read-load" => read_load::run(&args).await,
        "web-followers" => web_followers::run(&args).await,
        other => {
            bail!("unknown --mode {other:?}; use simulated, agents, read-load or web-followers")
        }
    }
}
