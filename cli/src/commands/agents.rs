//! `kiln agents` and `kiln agent drain NAME`.

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::view::AgentView;
use crate::{output, timefmt};

/// `kiln agents`.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let agents: Vec<AgentView> = coordinator
        .list_agents()
        .await?
        .into_iter()
        .map(AgentView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&agents)?,
        OutputFormat::Table => {
            output::line(output::agents_table(&agents, timefmt::now_ms()).trim_end())?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln agent drain NAME`.
pub(crate) async fn drain(
    coordinator: &Coordinator,
    format: OutputFormat,
    name: &str,
) -> Result<Outcome, CliError> {
    let agent = AgentView::from(coordinator.drain_agent(name).await?);
    match format {
        OutputFormat::Json => output::json(&agent)?,
        OutputFormat::Table => output::line(drained_line(&agent))?,
    }
    Ok(Outcome::Ok)
}

/// What draining means for this agent right now.
fn drained_line(agent: &AgentView) -> String {
    format!(
        "agent {} is {}: it takes no new stages and finishes the {} it runs",
        agent.name,
        agent.state.as_str(),
        agent.running
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::AgentState;

    #[test]
    fn drain_reports_what_is_left_running() {
        let agent = AgentView {
            name: "demo-agent-1".into(),
            state: AgentState::Draining,
            running: 2,
            capacity: 2,
            labels: Default::default(),
            version: String::new(),
            last_seen_ms: None,
            resources: Default::default(),
            in_use: Default::default(),
        };
        assert_eq!(
            drained_line(&agent),
            "agent demo-agent-1 is draining: it takes no new stages and finishes the 2 it runs"
        );
    }
}
