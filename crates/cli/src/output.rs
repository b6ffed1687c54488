//! How the cluster commands print what they read (`-o table|json|yaml`): a
//! table for a person, or the same data as JSON or YAML for a script, from
//! one serializable value.

use std::io::Write as _;

use anyhow::Result;
use serde::Serialize;

/// `-o`: the shape of the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for a person.
    #[default]
    Table,
    /// JSON, pretty-printed.
    Json,
    /// YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML, or `table()` for [`Format::Table`].
pub fn print(format: Format, value: &impl Serialize, table: impl FnOnce() -> String) -> Result<()> {
    let text = match format {
        Format::Table => table(),
        Format::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Format::Yaml => serde_saphyr::to_string(value)?,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `rows` (the first is the header) in columns three spaces apart, as kubectl
/// prints them; the last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if column + 1 < row.len() {
                line.push_str(&" ".repeat(widths[column] - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Seconds as kubectl's AGE column shows them: "45s", "12m", "5h", "3d".
pub fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Now, in unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["NAME".to_owned(), "AGE".to_owned()],
            vec!["controller-abc".to_owned(), "3s".to_owned()],
        ];
        assert_eq!(table(&rows), "NAME             AGE\ncontroller-abc   3s\n");
    }

    #[test]
    fn ages_use_their_largest_sensible_unit() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(5 * 3600), "5h");
        assert_eq!(age(3 * 86400), "3d");
        assert_eq!(age(-3), "0s", "a clock skew never shows a negative age");
    }
}
