//! Summary statistics of one case's samples.

use serde::Serialize;

/// Order statistics, mean and spread of a set of samples (all in one unit).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub iterations: usize,
    pub median: f64,
    pub p90: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sample standard deviation (n - 1); zero for a single sample.
    pub std_dev: f64,
}

impl Stats {
    /// Summarises `samples`; `None` when there are none.
    pub fn from_samples(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var =
            if n > 1 { sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(Stats {
            iterations: n,
            median: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p95: percentile(&sorted, 95.0),
            min: sorted[0],
            max: sorted[n - 1],
            mean,
            std_dev: var.sqrt(),
        })
    }
}

/// The `p`th percentile of sorted samples, interpolating linearly between
/// the two nearest ranks (so the median of an even count is the midpoint).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises() {
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.iterations, s.min, s.max, s.median, s.mean), (4, 1.0, 4.0, 2.5, 2.5));
        assert!((s.std_dev - 1.290_994).abs() < 1e-6);
        assert!((s.p90 - 3.7).abs() < 1e-9);
        let one = Stats::from_samples(&[7.0]).unwrap();
        assert_eq!((one.median, one.p95, one.std_dev), (7.0, 7.0, 0.0));
        assert!(Stats::from_samples(&[]).is_none());
    }
}
