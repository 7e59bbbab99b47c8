//! Kubernetes resource quantities (`resource.Quantity`): parsing (`500m`, `1.5`, `64Mi`, `1e3`,
//! `2k`), exact comparison and sums, and the canonical form the API server stores and prints
//! (`1.5` is `1500m`, `2048Ki` is `2Mi`, `1000` is `1k`).
//!
//! Values are kept as a whole number of nano-units (`i128`), the finest precision Kubernetes
//! keeps (finer values are rounded up, as the real parser does).

use std::cmp::Ordering;
use std::fmt;

/// How a quantity is written, which its canonical form keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `m`, `k`, `M`, `G`, ... or no suffix.
    DecimalSI,
    /// `Ki`, `Mi`, `Gi`, ...
    BinarySI,
    /// `1e3`, `5E-3`.
    DecimalExponent,
}

/// A parsed quantity.
#[derive(Debug, Clone, Copy)]
pub struct Quantity {
    nanos: i128,
    pub format: Format,
}

/// What the API server answers for a quantity it cannot parse.
pub const QUANTITY_ERROR: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";

const NANO: i128 = 1_000_000_000;
/// Beyond this a quantity is refused (far past anything a test writes; Exa is 1e18).
const LIMIT: i128 = 1_000_000_000_000_000_000_000_000_000_000;

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        self.nanos == other.nanos
    }
}

impl Eq for Quantity {}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Quantity {
    fn cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}

impl Quantity {
    /// Zero, written like the quota controller starts its sums.
    pub fn zero() -> Quantity {
        Quantity {
            nanos: 0,
            format: Format::DecimalSI,
        }
    }

    /// A whole number of units (`DecimalSI`).
    pub fn from_units(n: i64) -> Quantity {
        Quantity {
            nanos: i128::from(n) * NANO,
            format: Format::DecimalSI,
        }
    }

    /// Parses `s` like `resource.ParseQuantity`.
    pub fn parse(s: &str) -> Result<Quantity, String> {
        let s = s.trim();
        let err = || QUANTITY_ERROR.to_string();
        if s.is_empty() {
            return Err(err());
        }
        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(num_end);
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
            return Err(err());
        }
        let (base, exp) = parse_suffix(suffix).ok_or_else(err)?;
        let digits = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        if digits.len() > 36 {
            return Err(err());
        }
        let mantissa: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| err())?
        };
        // value = mantissa * 10^-frac * base^exp, in nanos: * 10^9.
        let mut pow10 = 9 - frac_part.len() as i32;
        let mut value = mantissa;
        if base == 10 {
            pow10 += exp;
        } else {
            for _ in 0..exp {
                value = value.checked_mul(1024).ok_or_else(err)?;
            }
        }
        let nanos = scale(value, pow10).ok_or_else(err)?;
        if nanos > LIMIT {
            return Err(err());
        }
        let format = match (base, suffix) {
            (2, _) => Format::BinarySI,
            (_, s) if s.starts_with(['e', 'E']) && s.len() > 1 => Format::DecimalExponent,
            _ => Format::DecimalSI,
        };
        Ok(Quantity {
            nanos: if negative { -nanos } else { nanos },
            format,
        })
    }

    /// Parses a quantity given as JSON: a string, or a number (`cpu: 1`).
    pub fn from_json(v: &serde_json::Value) -> Result<Quantity, String> {
        match v {
            serde_json::Value::String(s) => Quantity::parse(s),
            serde_json::Value::Number(n) => Quantity::parse(&n.to_string()),
            _ => Err(QUANTITY_ERROR.to_string()),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// `self + other`; a zero sum so far takes the other's format, like `Quantity.Add`.
    pub fn add(&self, other: &Quantity) -> Quantity {
        Quantity {
            nanos: self.nanos.saturating_add(other.nanos),
            format: if self.nanos == 0 {
                other.format
            } else {
                self.format
            },
        }
    }

    /// `self - other`.
    pub fn sub(&self, other: &Quantity) -> Quantity {
        Quantity {
            nanos: self.nanos.saturating_sub(other.nanos),
            format: self.format,
        }
    }

    /// The value in thousandths, rounded up (`MilliValue`).
    pub fn milli_value(&self) -> i128 {
        ceil_div(self.nanos, 1_000_000)
    }

    /// The value in units, rounded up (`Value`).
    pub fn value(&self) -> i128 {
        ceil_div(self.nanos, NANO)
    }

    /// `self / other` as a float (limit-to-request ratios).
    pub fn ratio(&self, other: &Quantity) -> f64 {
        self.nanos as f64 / other.nanos as f64
    }

    /// The canonical form (`Quantity.String()`).
    pub fn canonical(&self) -> String {
        if self.nanos == 0 {
            return "0".into();
        }
        let sign = if self.nanos < 0 { "-" } else { "" };
        let abs = self.nanos.unsigned_abs();
        if self.format == Format::BinarySI
            && abs >= 1024 * NANO as u128
            && abs.is_multiple_of(NANO as u128)
        {
            let mut units = abs / NANO as u128;
            let mut exp = 0;
            while exp < 6 && units.is_multiple_of(1024) {
                units /= 1024;
                exp += 1;
            }
            let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][exp];
            return format!("{sign}{units}{suffix}");
        }
        // Decimal: the largest power of 1000 (from 10^-9 to 10^18) that divides the value.
        let mut mantissa = abs;
        let mut exp: i32 = -9;
        while exp < 18 && mantissa.is_multiple_of(1000) {
            mantissa /= 1000;
            exp += 3;
        }
        let suffix = match self.format {
            Format::DecimalExponent if exp == 0 => String::new(),
            Format::DecimalExponent => format!("e{exp}"),
            _ => match exp {
                -9 => "n",
                -6 => "u",
                -3 => "m",
                0 => "",
                3 => "k",
                6 => "M",
                9 => "G",
                12 => "T",
                15 => "P",
                _ => "E",
            }
            .to_string(),
        };
        format!("{sign}{mantissa}{suffix}")
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// `(base, exponent)` of a suffix: `Mi` is (2, 2) in powers of 1024, `m` (10, -3), `e5` (10, 5).
fn parse_suffix(s: &str) -> Option<(u32, i32)> {
    let binary = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if let Some(i) = binary.iter().position(|b| *b == s) {
        return Some((2, i as i32 + 1));
    }
    let decimal = match s {
        "" => Some(0),
        "n" => Some(-9),
        "u" => Some(-6),
        "m" => Some(-3),
        "k" => Some(3),
        "M" => Some(6),
        "G" => Some(9),
        "T" => Some(12),
        "P" => Some(15),
        "E" => Some(18),
        _ => None,
    };
    if let Some(e) = decimal {
        return Some((10, e));
    }
    let rest = s.strip_prefix(['e', 'E'])?;
    let digits = rest.strip_prefix(['+', '-']).unwrap_or(rest);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 3 {
        return None;
    }
    rest.parse::<i32>().ok().map(|e| (10, e))
}

/// `value * 10^pow10`, rounding a fraction up (away from zero, as values are positive here).
fn scale(value: i128, pow10: i32) -> Option<i128> {
    if pow10 >= 0 {
        let mut v = value;
        for _ in 0..pow10 {
            v = v.checked_mul(10)?;
            if v > LIMIT {
                return None;
            }
        }
        Some(v)
    } else {
        let div = 10i128.checked_pow(pow10.unsigned_abs())?;
        Some(ceil_div(value, div))
    }
}

fn ceil_div(a: i128, b: i128) -> i128 {
    let q = a.div_euclid(b);
    if a.rem_euclid(b) == 0 { q } else { q + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        Quantity::parse(s)
            .map(|q| q.canonical())
            .unwrap_or_else(|e| e)
    }

    #[test]
    fn parses_and_canonicalizes_like_the_api_server() {
        for (input, want) in [
            ("500m", "500m"),
            ("0.5", "500m"),
            ("1.5", "1500m"),
            ("2000m", "2"),
            ("1", "1"),
            ("1000", "1k"),
            ("1500", "1500"),
            ("1.5k", "1500"),
            ("64Mi", "64Mi"),
            ("2048Ki", "2Mi"),
            ("1.5Gi", "1536Mi"),
            ("1000Ki", "1000Ki"),
            ("512", "512"),
            ("100Mi", "100Mi"),
            ("1e3", "1e3"),
            ("1.5e3", "1500"),
            ("129e6", "129e6"),
            ("129M", "129M"),
            ("0", "0"),
            ("-1", "-1"),
            ("+2", "2"),
            (".5", "500m"),
            ("1.", "1"),
            ("0.0000000001", "1n"),
            ("12n", "12n"),
            ("3u", "3u"),
            ("1E", "1E"),
            ("5E-3", "5e-3"),
        ] {
            assert_eq!(canon(input), want, "{input}");
        }
    }

    #[test]
    fn refuses_what_the_api_server_refuses() {
        for bad in ["", "abc", "1x", "1.2.3", "m", "1Kii", "1e", "--1", "1 Gi"] {
            assert_eq!(
                Quantity::parse(bad),
                Err(QUANTITY_ERROR.to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn compares_across_units() {
        let q = |s| Quantity::parse(s).expect("quantity");
        assert!(q("1") > q("999m"));
        assert_eq!(q("1"), q("1000m"));
        assert!(q("1Gi") > q("1G"));
        assert_eq!(q("1Ki"), q("1024"));
        assert!(q("64Mi") > q("32Mi"));
        assert_eq!(q("100m").milli_value(), 100);
        assert_eq!(q("1n").milli_value(), 1);
        assert_eq!(q("1.5").value(), 2);
    }

    #[test]
    fn sums_keep_the_first_format_and_zero_takes_the_other() {
        let q = |s| Quantity::parse(s).expect("quantity");
        assert_eq!(Quantity::zero().add(&q("1Gi")).canonical(), "1Gi");
        assert_eq!(q("1Gi").add(&q("512Mi")).canonical(), "1536Mi");
        assert_eq!(q("250m").add(&q("250m")).canonical(), "500m");
        assert_eq!(q("1").sub(&q("250m")).canonical(), "750m");
        assert_eq!(
            Quantity::from_json(&serde_json::json!(2)).map(|q| q.canonical()),
            Ok("2".into())
        );
        assert_eq!(
            Quantity::from_json(&serde_json::json!(0.25)).map(|q| q.canonical()),
            Ok("250m".into())
        );
    }
}
