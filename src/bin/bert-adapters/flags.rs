//! Numeric flags. clap is told to take any value, a leading `-` included (`allow_hyphen_values`:
//! `--lr -1e-3`, `--steps -inf`): otherwise `--lr -1` would be "unexpected argument '-1'". The command then refuses a value out
//! of range as any other bad input, with one line naming the flag and the reason (exit 1).

use std::num::IntErrorKind;

use bert_adapters::{Error, Result};

/// The value parser of every whole-number flag: the number as typed, sign included.
pub fn whole(s: &str) -> std::result::Result<i128, String> {
    s.parse::<i128>().map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => "too large a number".to_string(),
        _ => "not a whole number".to_string(),
    })
}

/// `value` of `flag`, which must be at least `min` and fit `T`.
pub fn at_least<T: TryFrom<i128>>(flag: &str, value: i128, min: i128) -> Result<T> {
    if value < min {
        return Err(Error::Input(format!("{flag} must be at least {min} (got {value})")));
    }
    T::try_from(value).map_err(|_| Error::Input(format!("{flag} {value} is too large")))
}

pub use bert_adapters::error::short_number as short;

/// `value` of `flag`, which must be a finite number above zero that f32 holds as a normal
/// number (the kernels compute in f32: 1e-50 would silently be 0 there, 1e39 infinite).
pub fn positive(flag: &str, value: f64) -> Result<f64> {
    in_f32_range(flag, finite_positive(flag, value)?)
}

/// `value` of `flag`, which must be a finite number above zero (its own range checked after).
pub fn finite_positive(flag: &str, value: f64) -> Result<f64> {
    if value.is_nan() || value.is_infinite() {
        return Err(Error::Input(format!("{flag} must be a finite number (got {value})")));
    }
    if value <= 0.0 {
        return Err(Error::Input(format!("{flag} must be > 0 (got {})", short(value))));
    }
    Ok(value)
}

/// `value` of `flag`, which must be a finite number, zero or more; above zero, within f32's
/// normal range as for [`positive`].
pub fn non_negative(flag: &str, value: f64) -> Result<f64> {
    if value.is_nan() || value.is_infinite() {
        return Err(Error::Input(format!("{flag} must be a finite number (got {value})")));
    }
    if value < 0.0 {
        return Err(Error::Input(format!("{flag} must be >= 0 (got {})", short(value))));
    }
    if value == 0.0 {
        return Ok(0.0);
    }
    in_f32_range(flag, value)
}

fn in_f32_range(flag: &str, value: f64) -> Result<f64> {
    if value < f32::MIN_POSITIVE as f64 || value > f32::MAX as f64 {
        return Err(Error::Input(format!("{flag} {} is outside f32's normal range, {:e} to {:e}, in which it is computed", short(value), f32::MIN_POSITIVE, f32::MAX)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_are_named_with_the_reason() {
        assert_eq!(whole("-3"), Ok(-3));
        assert_eq!(whole("18446744073709551615"), Ok(u64::MAX as i128));
        assert_eq!(whole("1.5").unwrap_err(), "not a whole number");
        assert_eq!(whole("9".repeat(50).as_str()).unwrap_err(), "too large a number");
        assert_eq!(at_least::<u64>("--steps", 7, 1).unwrap(), 7);
        assert_eq!(at_least::<u64>("--steps", -1, 1).unwrap_err().to_string(), "invalid input: --steps must be at least 1 (got -1)");
        assert_eq!(at_least::<u64>("--seed", u64::MAX as i128 + 1, 0).unwrap_err().to_string(), "invalid input: --seed 18446744073709551616 is too large");
        assert_eq!(positive("--lr", 1e-3).unwrap(), 1e-3);
        assert_eq!(positive("--lr", -1.0).unwrap_err().to_string(), "invalid input: --lr must be > 0 (got -1)");
        assert_eq!(positive("--lr", 0.0).unwrap_err().to_string(), "invalid input: --lr must be > 0 (got 0)");
        assert_eq!(positive("--lr", f64::NEG_INFINITY).unwrap_err().to_string(), "invalid input: --lr must be a finite number (got -inf)");
        assert_eq!(positive("--lr", f64::NAN).unwrap_err().to_string(), "invalid input: --lr must be a finite number (got NaN)");
        assert_eq!(non_negative("--weight-decay", 0.0).unwrap(), 0.0);
        assert_eq!(non_negative("--weight-decay", -0.5).unwrap_err().to_string(), "invalid input: --weight-decay must be >= 0 (got -0.5)");
        assert_eq!(non_negative("--weight-decay", f64::INFINITY).unwrap_err().to_string(), "invalid input: --weight-decay must be a finite number (got inf)");
        // What f32 cannot hold as a normal number would be computed as 0 or infinity.
        assert_eq!(positive("--lr", 1e-50).unwrap_err().to_string(), "invalid input: --lr 1.000e-50 is outside f32's normal range, 1.1754944e-38 to 3.4028235e38, in which it is computed");
        assert_eq!(positive("--lr", 1e308).unwrap_err().to_string(), "invalid input: --lr 1.000e308 is outside f32's normal range, 1.1754944e-38 to 3.4028235e38, in which it is computed");
        assert!(non_negative("--max-grad-norm", 1e-50).is_err() && non_negative("--max-grad-norm", 1e-30).is_ok());
        assert_eq!(short(2f64.powi(64)), "1.845e19");
        assert_eq!(short(0.5), "0.5");
    }
}
