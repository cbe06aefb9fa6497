//! `--name value` flags with defaults; the bench needs nothing fancier.

pub(crate) struct Args(Vec<String>);

impl Args {
    pub(crate) fn from_env() -> Self {
        Self(std::env::args().skip(1).collect())
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|arg| arg == name)
            .and_then(|at| self.0.get(at + 1))
            .map(String::as_str)
    }

    /// A number; `default` when the flag is absent or not a number.
    pub(crate) fn get(&self, name: &str, default: u64) -> u64 {
        self.value(name)
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    }

    pub(crate) fn text(&self, name: &str, default: &str) -> String {
        self.value(name).unwrap_or(default).to_owned()
    }
}
