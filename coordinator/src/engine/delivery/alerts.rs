//! The alerts the delivery controller raises. They are queued here and
//! handed to the alerter by the runner, so the loop never waits on a
//! network.

use std::collections::BTreeMap;
use std::time::SystemTime;

use kiln_common::ids::EnvKey;

use super::DeliveryController;
use crate::delivery::alerts::Alert;
use crate::engine::runs::RunView;
use crate::store::RollbackPlan;

impl DeliveryController {
    pub(super) fn raise(
        &mut self,
        name: &str,
        severity: &str,
        labels: &[(&str, String)],
        summary: String,
    ) {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        tracing::warn!(alertname = name, %summary, "alert");
        self.alerts.push(Alert {
            name: name.to_owned(),
            severity: severity.to_owned(),
            labels,
            description: summary.clone(),
            summary,
            starts_at: SystemTime::now(),
            ends_at: None,
        });
    }

    pub(super) fn alert_gate_failed(&mut self, run: &RunView<'_>, idx: usize, summary: &str) {
        let stage = run.stages[idx].name.clone();
        let labels = [
            ("pipeline", run.record.pipeline.clone()),
            ("run", run.record.id.to_string()),
            ("stage", stage.clone()),
        ];
        self.raise(
            "KilnGateFailed",
            "warning",
            &labels,
            format!("gate `{stage}` of run {} failed: {summary}", run.record.id),
        );
    }

    pub(super) fn alert_breach(&mut self, environment: &EnvKey, release: u64, reason: &str) {
        let labels = environment_labels(environment, release);
        self.raise("KilnMonitorBreach", "critical", &labels, reason.to_owned());
    }

    /// A release restored by a rollback breaches too: the environment is
    /// frozen and a person looks at the data.
    pub(super) fn alert_data_suspected(
        &mut self,
        environment: &EnvKey,
        release: u64,
        reason: &str,
    ) {
        let labels = environment_labels(environment, release);
        self.raise("KilnDataSuspected", "critical", &labels, reason.to_owned());
    }

    pub(super) fn alert_rolled_back(&mut self, plan: &RollbackPlan) {
        let labels = environment_labels(&plan.environment, plan.from);
        let summary = format!(
            "rolled `{}` back from release {} to release {}: {}",
            plan.environment, plan.from, plan.to, plan.reason
        );
        self.raise("KilnRollback", "critical", &labels, summary);
    }

    pub(super) fn alert_rollback_failed(&mut self, plan: &RollbackPlan) {
        let labels = environment_labels(&plan.environment, plan.from);
        let summary = format!(
            "rollback of `{}` from release {} to {} FAILED; release {} is still live",
            plan.environment, plan.from, plan.to, plan.from
        );
        self.raise("KilnRollbackFailed", "critical", &labels, summary);
    }

    pub(super) fn alert_rollback_not_started(
        &mut self,
        environment: &EnvKey,
        release: u64,
        why: &str,
    ) {
        let labels = environment_labels(environment, release);
        let summary = format!("cannot roll `{environment}` back from release {release}: {why}");
        self.raise("KilnRollbackFailed", "critical", &labels, summary);
    }
}

/// An environment alert's labels: the pipeline is its own label, so
/// routes and silences can tell `credit/production` from
/// `churn/production`.
pub(super) fn environment_labels(
    environment: &EnvKey,
    release: u64,
) -> [(&'static str, String); 3] {
    [
        ("pipeline", environment.pipeline().to_owned()),
        ("environment", environment.name.clone()),
        ("release", release.to_string()),
    ]
}
