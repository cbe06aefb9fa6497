//! Agent labels: `role=deploy,os=linux` on the command line, a map on the
//! wire, and the rule that decides whether a stage may run on an agent.

use std::collections::BTreeMap;

/// Parses `k=v,k=v` (empty string = no labels).
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "label `{pair}` has no `=`; write labels as key=value,key=value"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(format!("label `{pair}` has an empty key"));
        }
        labels.insert(key.to_owned(), value.to_owned());
    }
    Ok(labels)
}

/// True when every label the stage asks for is on the agent with that value.
pub fn satisfies<'a>(
    agent: &BTreeMap<String, String>,
    wanted: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> bool {
    wanted
        .into_iter()
        .all(|(key, value)| agent.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_rejects_missing_equals() {
        let labels = parse("role=deploy, os=linux").unwrap();
        assert_eq!(labels["role"], "deploy");
        assert_eq!(labels["os"], "linux");
        assert!(parse("").unwrap().is_empty());
        assert!(parse("role").unwrap_err().contains("role"));
    }

    #[test]
    fn stage_needs_every_label() {
        let agent = parse("role=deploy,os=linux").unwrap();
        assert!(satisfies(&agent, &parse("role=deploy").unwrap()));
        assert!(!satisfies(&agent, &parse("role=train").unwrap()));
        assert!(!satisfies(&agent, &parse("gpu=yes").unwrap()));
    }
}
