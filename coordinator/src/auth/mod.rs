//! Who may call what: bearer tokens, roles and the one table that gives
//! every gRPC method its rule.
//!
//! Every request passes [`layer::AuthLayer`] before any service sees it:
//! the layer finds the token, checks the method's [`Rule`], hands the
//! [`Principal`] to the handler through the request's extensions and
//! records state-changing calls in the audit log. A method missing from
//! [`rule`] is refused, and a test fails for every method of the served
//! descriptor sets that has no rule, so a new RPC cannot slip through
//! unguarded.

pub(crate) mod layer;
pub(crate) mod tokens;

use tonic::Request;

use crate::error::ApiError;
pub(crate) use crate::store::Role;

/// The caller a request was authenticated as.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Principal {
    /// The token's name, which the audit log and `triggered_by` record.
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Set for pipeline tokens: the one pipeline they may act on.
    pub(crate) pipeline: Option<String>,
}

impl Principal {
    /// The principal the auth layer attached; a handler reached without
    /// the layer refuses rather than runs unauthenticated.
    pub(crate) fn of<T>(request: &Request<T>) -> Result<Self, ApiError> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("no authenticated caller".into()))
    }

    /// Pipeline tokens may only touch their own pipeline.
    pub(crate) fn check_pipeline(&self, pipeline: &str) -> Result<(), ApiError> {
        match (&self.role, &self.pipeline) {
            (Role::Pipeline, Some(own)) if own != pipeline => {
                Err(ApiError::PermissionDenied(format!(
                    "token `{}` may only act on pipeline `{own}`, not `{pipeline}`",
                    self.name
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Who may call one method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rule {
    /// Callers without a token are let through (health checks only).
    pub(crate) public: bool,
    /// The least user role allowed (viewer < operator < admin); `None` =
    /// no user token.
    pub(crate) users: Option<Role>,
    pub(crate) agents: bool,
    /// Pipeline tokens are allowed; the handler checks the pipeline named
    /// in the request with [`Principal::check_pipeline`].
    pub(crate) pipelines: bool,
    /// The call changes state and goes into the audit log.
    pub(crate) audited: bool,
}

impl Rule {
    const PUBLIC: Rule = Rule {
        public: true,
        users: None,
        agents: false,
        pipelines: false,
        audited: false,
    };

    const fn read(min: Role) -> Rule {
        Rule {
            public: false,
            users: Some(min),
            agents: false,
            pipelines: false,
            audited: false,
        }
    }

    const fn write(min: Role) -> Rule {
        Rule {
            audited: true,
            ..Rule::read(min)
        }
    }

    const fn and_agents(self) -> Rule {
        Rule {
            agents: true,
            ..self
        }
    }

    const fn and_pipelines(self) -> Rule {
        Rule {
            pipelines: true,
            ..self
        }
    }

    /// Whether `role` passes this rule (before any pipeline check). A
    /// public method takes every valid token: clients that send theirs with
    /// every call (the CLI, agents) must still pass health checks.
    pub(crate) fn allows(&self, role: Role) -> bool {
        if self.public {
            return true;
        }
        match role {
            Role::Agent => self.agents,
            Role::Pipeline => self.pipelines,
            user => self.users.is_some_and(|min| rank(user) >= rank(min)),
        }
    }
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Viewer => 1,
        Role::Operator => 2,
        Role::Admin => 3,
        Role::Agent | Role::Pipeline => 0,
    }
}

/// The rule of a full gRPC method path; `None` = unknown method, refused.
pub(crate) fn rule(method: &str) -> Option<Rule> {
    use Role::{Admin, Operator, Viewer};
    let (service, name) = method.strip_prefix('/')?.split_once('/')?;
    let rule = match (service, name) {
        ("grpc.health.v1.Health", "Check" | "Watch") => Rule::PUBLIC,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Rule::read(Viewer),
        ("kiln.v1.AgentService", "Connect") => Rule {
            users: None,
            ..Rule::write(Admin).and_agents()
        },
        // A backup holds every secret (sealed) and the key that opens them.
        ("kiln.v1.AdminService", "Backup") => Rule::write(Admin),
        ("kiln.v1.ArtifactService", name) => match name {
            "StatBlob" => Rule::read(Viewer).and_agents().and_pipelines(),
            "UploadBlob" => Rule::write(Operator).and_agents().and_pipelines(),
            "DownloadBlob" => Rule::read(Viewer).and_agents(),
            "GetCache" => Rule {
                users: None,
                ..Rule::read(Admin).and_agents()
            },
            "PutCache" => Rule {
                users: None,
                ..Rule::write(Admin).and_agents()
            },
            _ => return None,
        },
        ("kiln.v1.ControlService", name) => match name {
            "RegisterPipeline" | "AddRepository" | "TriggerRun" => {
                Rule::write(Operator).and_pipelines()
            }
            "WhoAmI" => Rule::read(Viewer).and_agents().and_pipelines(),
            "ListPipelines" | "GetPipeline" | "GetRun" | "ListRuns" | "WatchRun" | "StreamLogs"
            | "ListAgents" | "ListArtifacts" | "ListEnvironments" | "EnvironmentHistory"
            | "MetricHistory" | "GetRelease" | "GetProvenance" | "GetProvenanceKey" | "Lineage"
            | "ListCaches" | "RolloutStatus" | "ListModels" | "GetModelVersion" => {
                Rule::read(Viewer)
            }
            "CancelRun"
            | "RetryStage"
            | "ApproveStage"
            | "RejectStage"
            | "Rollback"
            | "UnfreezeEnvironment"
            | "RolloutPromote"
            | "RolloutAbort"
            | "ClearCaches"
            | "SetModelAlias"
            | "Promote" => Rule::write(Operator),
            "DrainAgent" | "CollectGarbage" | "CreateToken" | "RevokeToken" | "SetSecret"
            | "DeleteSecret" => Rule::write(Admin),
            "ListTokens" | "ListSecrets" | "ListAudit" => Rule::read(Admin),
            _ => return None,
        },
        _ => return None,
    };
    Some(rule)
}

/// What a handler acted on, for the audit log: put it in the response's
/// extensions and the layer records it.
#[derive(Clone, Debug)]
pub(crate) struct AuditTarget(pub(crate) String);

/// Attaches an audit target to a response.
pub(crate) fn audited<T>(message: T, target: impl Into<String>) -> tonic::Response<T> {
    let mut response = tonic::Response::new(message);
    response.extensions_mut().insert(AuditTarget(target.into()));
    response
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// Every method the coordinator serves, from the descriptor sets it
    /// registers for reflection.
    fn served_methods() -> Vec<String> {
        let mut methods = Vec::new();
        for encoded in [
            kiln_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let set = FileDescriptorSet::decode(encoded).expect("descriptor sets decode");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        methods
    }

    #[test]
    fn every_served_method_has_a_rule() {
        let methods = served_methods();
        assert!(methods.len() > 30, "found only {methods:?}");
        let missing: Vec<_> = methods.iter().filter(|m| rule(m).is_none()).collect();
        assert!(missing.is_empty(), "methods without a rule: {missing:?}");
    }

    #[test]
    fn unknown_methods_and_malformed_paths_have_no_rule() {
        for path in [
            "/kiln.v1.ControlService/DropDatabase",
            "/kiln.v1.Unknown/Connect",
            "kiln.v1.ControlService/GetRun",
            "/",
            "",
        ] {
            assert_eq!(rule(path), None, "{path}");
        }
    }

    #[test]
    fn roles_nest_and_agents_and_pipelines_are_kept_apart() {
        let rule = |m: &str| rule(&format!("/kiln.v1.ControlService/{m}")).unwrap();
        let check = |r: Rule, role: Role| r.allows(role);
        assert!(check(rule("GetRun"), Role::Viewer));
        assert!(check(rule("GetRun"), Role::Admin));
        assert!(!check(rule("GetRun"), Role::Agent));
        assert!(!check(rule("CancelRun"), Role::Viewer));
        assert!(check(rule("CancelRun"), Role::Operator));
        assert!(!check(rule("CreateToken"), Role::Operator));
        assert!(check(rule("TriggerRun"), Role::Pipeline));
        assert!(!check(rule("CancelRun"), Role::Pipeline));
        let health = super::rule("/grpc.health.v1.Health/Check").unwrap();
        for role in [
            Role::Viewer,
            Role::Operator,
            Role::Admin,
            Role::Agent,
            Role::Pipeline,
        ] {
            assert!(check(health, role), "{role:?}");
        }
        let connect = super::rule("/kiln.v1.AgentService/Connect").unwrap();
        assert!(check(connect, Role::Agent));
        assert!(!check(connect, Role::Admin));
    }

    #[test]
    fn pipeline_tokens_stay_in_their_pipeline() {
        let principal = Principal {
            name: "repo".into(),
            role: Role::Pipeline,
            pipeline: Some("hello".into()),
        };
        assert!(principal.check_pipeline("hello").is_ok());
        let error = principal.check_pipeline("other").unwrap_err().to_string();
        assert!(error.contains("only act on pipeline `hello`"), "{error}");
    }
}
