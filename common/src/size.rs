//! Byte sizes as Kiln writes them everywhere — `memory:` in `kiln.yml` and
//! every command-line flag that takes a size: `512MiB`, `2Gi`, `1G`,
//! `64kB`, `1048576`. [`parse`] is the one reader.
//!
//! Binary units (`Ki`, `Mi`, `Gi`, `Ti`, with or without a trailing `B`)
//! are powers of 1024; decimal units (`k`/`K`, `M`, `G`, `T`, with or
//! without `B`) powers of 1000; a bare number (or `B`) is bytes.

/// What an error message offers as valid values.
pub const EXAMPLES: &str = "512MiB, 2Gi, 1G or 1048576";

/// The bytes `text` says, or what is wrong with it.
pub fn parse(text: &str) -> Result<u64, String> {
    let n_digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let fail = |why: &str| format!("`{text}` is not a size: {why}; write e.g. {EXAMPLES}");
    if n_digits == 0 {
        return Err(fail("it must start with a whole number"));
    }
    let number: u64 = text[..n_digits]
        .parse()
        .map_err(|_| fail("the number is too large"))?;
    let unit = &text[n_digits..];
    let multiplier: u64 = match unit.strip_suffix('B').unwrap_or(unit) {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(fail(&format!("unknown unit `{unit}`"))),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| fail("it is more than 16 EiB"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn binary_and_decimal_units_with_or_without_b() {
        for (text, bytes) in [
            ("512MiB", 512 << 20),
            ("512Mi", 512 << 20),
            ("2Gi", 2 << 30),
            ("2GiB", 2 << 30),
            ("1G", 1_000_000_000),
            ("1GB", 1_000_000_000),
            ("64k", 64_000),
            ("64kB", 64_000),
            ("1048576", 1 << 20),
            ("100B", 100),
            ("0", 0),
        ] {
            assert_eq!(parse(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "Gi",
            "2gi",
            "1.5Gi",
            "-1",
            "2 Gi",
            "99999999999Ti",
            "2BB",
            "2iB",
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains("512MiB"), "{bad}: {error}");
        }
    }
}
