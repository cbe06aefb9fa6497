//! Which environment a request names. An environment belongs to a pipeline
//! (`credit/production`); a request may leave the pipeline out when only
//! one pipeline has an environment of that name.

use kiln_common::ids::EnvKey;

use super::ControlApi;
use crate::error::ApiError;

impl ControlApi {
    /// The environment `name` of `pipeline`, or ("" pipeline) of the one
    /// pipeline that has one by that name.
    pub(super) fn resolve_environment(
        &self,
        pipeline: &str,
        name: &str,
    ) -> Result<EnvKey, ApiError> {
        let known: Vec<EnvKey> = if pipeline.is_empty() {
            self.store
                .environments()?
                .into_iter()
                .map(|env| env.key)
                .collect()
        } else {
            Vec::new()
        };
        resolve(&known, pipeline, name)
    }
}

/// [`ControlApi::resolve_environment`] over the environments `known`.
fn resolve(known: &[EnvKey], pipeline: &str, name: &str) -> Result<EnvKey, ApiError> {
    if name.is_empty() {
        return Err(ApiError::InvalidArgument(
            "no environment given; name one as PIPELINE/ENV (e.g. credit/production)".into(),
        ));
    }
    if !pipeline.is_empty() {
        return Ok(EnvKey::of_pipeline(pipeline, name));
    }
    let candidates: Vec<&EnvKey> = known.iter().filter(|key| key.name == name).collect();
    match candidates.as_slice() {
        [] => Err(ApiError::NotFound(format!(
            "no pipeline has an environment `{name}` with releases; `kiln env ls` lists them"
        ))),
        [only] => Ok((*only).clone()),
        several => {
            let names: Vec<String> = several.iter().map(|key| key.to_string()).collect();
            Err(ApiError::InvalidArgument(format!(
                "environment `{name}` exists in more than one pipeline ({}); name one as \
                 PIPELINE/ENV, e.g. {}",
                names.join(", "),
                names[0]
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_resolves_only_when_one_pipeline_has_it() {
        let known = [
            EnvKey::of_pipeline("churn", "production"),
            EnvKey::of_pipeline("credit", "production"),
            EnvKey::of_pipeline("credit", "staging"),
        ];
        let staging = resolve(&known, "", "staging").unwrap();
        assert_eq!(staging, EnvKey::of_pipeline("credit", "staging"));
        let explicit = resolve(&known, "churn", "production").unwrap();
        assert_eq!(explicit, EnvKey::of_pipeline("churn", "production"));

        let ambiguous = resolve(&known, "", "production").unwrap_err().to_string();
        assert_eq!(
            ambiguous,
            "environment `production` exists in more than one pipeline (churn/production, \
             credit/production); name one as PIPELINE/ENV, e.g. churn/production"
        );
        let unknown = resolve(&known, "", "canary").unwrap_err();
        assert!(matches!(unknown, ApiError::NotFound(_)), "{unknown}");
        assert!(resolve(&known, "", "").is_err());
    }
}
