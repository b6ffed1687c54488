//! Kubernetes resource quantities, as the sidecar's resource settings and
//! annotations spell them: CPU (`250m`, `0.5`) in millicores, memory (`64Mi`,
//! `1G`) in bytes. Pure.

/// Parses a Kubernetes CPU quantity (`250m`, `0.5`, `2`) into millicores.
pub fn parse_cpu(value: &str) -> Result<u64, String> {
    let value = value.trim();
    if let Some(milli) = value.strip_suffix('m') {
        return milli
            .parse::<u64>()
            .map_err(|_| "expected millicores such as 250m or cores such as 0.5".to_string());
    }
    let cores: f64 = value
        .parse()
        .map_err(|_| "expected millicores such as 250m or cores such as 0.5".to_string())?;
    if !cores.is_finite() || !(0.0..=1e6).contains(&cores) {
        return Err("out of range".to_string());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Parses a Kubernetes memory quantity (`64Mi`, `1Gi`, `128M`, `1000000`) into
/// bytes.
pub fn parse_memory(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let expected = || "expected a quantity such as 64Mi, 1Gi or 128M".to_string();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: f64 = number.parse().map_err(|_| expected())?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(expected()),
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || !(0.0..=1e15).contains(&bytes) {
        return Err("out of range".to_string());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.1"), Ok(100));
        assert!(parse_cpu("-1").is_err());
        assert_eq!(parse_memory("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1000"), Ok(1000));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert!(parse_memory("Mi").is_err());
        assert!(parse_memory("1Xi").is_err());
    }
}
