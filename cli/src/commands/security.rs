//! `kiln token`, `kiln secret`, `kiln audit` and `kiln whoami`.

use std::io::Read;

use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{OutputFormat, SecretCommand, TokenCommand, TokenRole};
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::{output, timefmt};

/// A token as printed; never carries its secret.
#[derive(Serialize)]
struct TokenView {
    name: String,
    role: &'static str,
    pipeline: Option<String>,
    created_ms: u64,
    created_by: String,
    revoked_ms: Option<u64>,
}

impl From<pb::Token> for TokenView {
    fn from(token: pb::Token) -> Self {
        let role = match pb::Role::try_from(token.role) {
            Ok(pb::Role::Viewer) => "viewer",
            Ok(pb::Role::Operator) => "operator",
            Ok(pb::Role::Admin) => "admin",
            Ok(pb::Role::Agent) => "agent",
            Ok(pb::Role::Pipeline) => "pipeline",
            _ => "unknown",
        };
        Self {
            name: token.name,
            role,
            pipeline: Some(token.pipeline).filter(|p| !p.is_empty()),
            created_ms: token.created_ms,
            created_by: token.created_by,
            revoked_ms: Some(token.revoked_ms).filter(|&ms| ms != 0),
        }
    }
}

/// `kiln token create|list|revoke`.
pub(crate) async fn token(
    c: &Coordinator,
    format: OutputFormat,
    command: TokenCommand,
) -> Result<Outcome, CliError> {
    match command {
        TokenCommand::Create {
            name,
            role,
            pipeline,
        } => {
            let request = pb::CreateTokenRequest {
                name,
                role: proto_role(role) as i32,
                pipeline: pipeline.unwrap_or_default(),
            };
            let created = c
                .call(|mut rpc| async move { rpc.create_token(request).await })
                .await?;
            let token = TokenView::from(created.token.unwrap_or_default());
            match format {
                OutputFormat::Json => {
                    #[derive(Serialize)]
                    struct Created {
                        token: TokenView,
                        secret: String,
                    }
                    output::json(&Created {
                        token,
                        secret: created.secret,
                    })?;
                }
                OutputFormat::Table => {
                    eprintln!(
                        "token {} ({}) created; its secret is shown only now:",
                        token.name, token.role
                    );
                    output::line(created.secret)?;
                }
            }
        }
        TokenCommand::List => {
            let tokens: Vec<TokenView> = c
                .call(|mut rpc| async move { rpc.list_tokens(pb::ListTokensRequest {}).await })
                .await?
                .tokens
                .into_iter()
                .map(TokenView::from)
                .collect();
            match format {
                OutputFormat::Json => output::json(&tokens)?,
                OutputFormat::Table => output::line(tokens_table(&tokens).trim_end())?,
            }
        }
        TokenCommand::Revoke { name } => {
            let request = pb::RevokeTokenRequest { name };
            let token = TokenView::from(
                c.call(|mut rpc| async move { rpc.revoke_token(request).await })
                    .await?,
            );
            match format {
                OutputFormat::Json => output::json(&token)?,
                OutputFormat::Table => output::line(format!("token {} revoked", token.name))?,
            }
        }
    }
    Ok(Outcome::Ok)
}

fn tokens_table(tokens: &[TokenView]) -> String {
    let rows: Vec<[String; 5]> = tokens
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.role.to_owned(),
                t.pipeline.clone().unwrap_or_else(|| "-".into()),
                timefmt::datetime(t.created_ms),
                t.revoked_ms.map_or_else(
                    || "valid".into(),
                    |ms| format!("revoked {}", timefmt::datetime(ms)),
                ),
            ]
        })
        .collect();
    output::table(["NAME", "ROLE", "PIPELINE", "CREATED", "STATE"], &rows)
}

fn proto_role(role: TokenRole) -> pb::Role {
    match role {
        TokenRole::Viewer => pb::Role::Viewer,
        TokenRole::Operator => pb::Role::Operator,
        TokenRole::Admin => pb::Role::Admin,
        TokenRole::Agent => pb::Role::Agent,
        TokenRole::Pipeline => pb::Role::Pipeline,
    }
}

#[derive(Serialize)]
struct SecretView {
    name: String,
    updated_ms: u64,
    updated_by: String,
}

impl From<pb::SecretInfo> for SecretView {
    fn from(info: pb::SecretInfo) -> Self {
        Self {
            name: info.name,
            updated_ms: info.updated_ms,
            updated_by: info.updated_by,
        }
    }
}

/// `kiln secret set|list|rm`.
pub(crate) async fn secret(
    c: &Coordinator,
    format: OutputFormat,
    command: SecretCommand,
) -> Result<Outcome, CliError> {
    let (verb, info) = match command {
        SecretCommand::Set { name } => {
            let value = read_value()?;
            let request = pb::SetSecretRequest { name, value };
            let info = c
                .call(|mut rpc| async move { rpc.set_secret(request).await })
                .await?;
            ("set", info)
        }
        SecretCommand::Rm { name } => {
            let request = pb::DeleteSecretRequest { name };
            let info = c
                .call(|mut rpc| async move { rpc.delete_secret(request).await })
                .await?;
            ("removed", info)
        }
        SecretCommand::List => {
            let secrets: Vec<SecretView> = c
                .call(|mut rpc| async move { rpc.list_secrets(pb::ListSecretsRequest {}).await })
                .await?
                .secrets
                .into_iter()
                .map(SecretView::from)
                .collect();
            match format {
                OutputFormat::Json => output::json(&secrets)?,
                OutputFormat::Table => {
                    let rows: Vec<[String; 3]> = secrets
                        .iter()
                        .map(|s| {
                            [
                                s.name.clone(),
                                timefmt::datetime(s.updated_ms),
                                s.updated_by.clone(),
                            ]
                        })
                        .collect();
                    output::line(output::table(["NAME", "UPDATED", "BY"], &rows).trim_end())?;
                }
            }
            return Ok(Outcome::Ok);
        }
    };
    let view = SecretView::from(info);
    match format {
        OutputFormat::Json => output::json(&view)?,
        OutputFormat::Table => output::line(format!("secret {} {verb}", view.name))?,
    }
    Ok(Outcome::Ok)
}

/// The secret's value from stdin: a value on the command line would sit in
/// shell history and process listings. One trailing newline is dropped, as
/// `echo` and here-strings add it.
fn read_value() -> Result<String, CliError> {
    let mut value = String::new();
    std::io::stdin()
        .read_to_string(&mut value)
        .map_err(|error| CliError::Input(format!("cannot read the secret from stdin: {error}")))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(CliError::Input(
            "the secret is empty; pipe its value to stdin, e.g. `kiln secret set NAME < file`"
                .into(),
        ));
    }
    Ok(value)
}

/// `kiln audit`.
pub(crate) async fn audit(
    c: &Coordinator,
    format: OutputFormat,
    limit: u32,
) -> Result<Outcome, CliError> {
    let entries = c
        .call(|mut rpc| async move { rpc.list_audit(pb::ListAuditRequest { limit }).await })
        .await?
        .entries;
    match format {
        OutputFormat::Json => {
            #[derive(Serialize)]
            struct Entry {
                at_ms: u64,
                principal: String,
                method: String,
                target: String,
                outcome: String,
                message: String,
                peer: String,
            }
            let entries: Vec<Entry> = entries
                .into_iter()
                .map(|e| Entry {
                    at_ms: e.at_ms,
                    principal: e.principal,
                    method: e.method,
                    target: e.target,
                    outcome: e.outcome,
                    message: e.message,
                    peer: e.peer,
                })
                .collect();
            output::json(&entries)?;
        }
        OutputFormat::Table => {
            let rows: Vec<[String; 5]> = entries
                .iter()
                .map(|e| {
                    [
                        timefmt::datetime(e.at_ms),
                        e.principal.clone(),
                        e.method.rsplit('/').next().unwrap_or_default().to_owned(),
                        e.target.clone(),
                        e.outcome.clone(),
                    ]
                })
                .collect();
            output::line(
                output::table(["WHEN", "WHO", "CALL", "TARGET", "OUTCOME"], &rows).trim_end(),
            )?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln whoami`.
pub(crate) async fn whoami(c: &Coordinator, format: OutputFormat) -> Result<Outcome, CliError> {
    let token = TokenView::from(
        c.call(|mut rpc| async move { rpc.who_am_i(pb::WhoAmIRequest {}).await })
            .await?,
    );
    match format {
        OutputFormat::Json => output::json(&token)?,
        OutputFormat::Table => output::line(format!(
            "{} ({}{})",
            token.name,
            token.role,
            token
                .pipeline
                .as_deref()
                .map(|p| format!(", pipeline {p}"))
                .unwrap_or_default()
        ))?,
    }
    Ok(Outcome::Ok)
}
