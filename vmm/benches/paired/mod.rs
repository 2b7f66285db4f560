//! Paired timing for a shared machine: a baseline and a candidate run in
//! alternating short batches, the order swapped every round, and the figure
//! is the median of the per-round ratios. Drift (clock frequency, a busy
//! neighbour) lasting longer than a round hits both sides of that round
//! alike, so the ratio stays steady where two separate criterion runs
//! minutes apart move by tens of percent.

use std::time::Duration;

/// The bench's name filter (`cargo bench ... -- NAME`): the first
/// argument that is neither a flag nor a number, or "" for every bench.
#[allow(dead_code, reason = "message_dma runs its pair unfiltered")]
pub fn filter_argument() -> String {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .unwrap_or_default()
}

/// Runs a workload `n` times and returns the wall time it took.
pub type Batch<'a> = &'a mut dyn FnMut(u64) -> Duration;

pub struct Paired {
    /// Iterations per batch.
    pub iterations: u64,
    pub rounds: usize,
    pub baseline_per_iteration: Duration,
    pub candidate_per_iteration: Duration,
    /// Quartiles of candidate time / baseline time, one ratio per round.
    pub ratio: [f64; 3],
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [q1, median, q3] = self.ratio;
        write!(
            f,
            "baseline {:?}, candidate {:?}, ratio {median:.3} (quartiles {q1:.3}-{q3:.3}; {} rounds of {} iterations)",
            self.baseline_per_iteration, self.candidate_per_iteration, self.rounds, self.iterations
        )
    }
}

/// Calibrates the batch so the slower side takes about `batch`, then runs
/// `rounds` rounds.
pub fn compare(
    baseline: Batch<'_>,
    candidate: Batch<'_>,
    batch: Duration,
    rounds: usize,
) -> Paired {
    let mut iterations = 1u64;
    loop {
        let slower = baseline(iterations).max(candidate(iterations));
        if slower >= batch || iterations >= 1 << 30 {
            break;
        }
        iterations *= 2;
    }
    let mut ratios = Vec::with_capacity(rounds);
    let mut baseline_times = Vec::with_capacity(rounds);
    let mut candidate_times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (b, c) = if round % 2 == 0 {
            let b = baseline(iterations);
            (b, candidate(iterations))
        } else {
            let c = candidate(iterations);
            (baseline(iterations), c)
        };
        ratios.push(c.as_secs_f64() / b.as_secs_f64().max(1e-12));
        baseline_times.push(b);
        candidate_times.push(c);
    }
    let per_iteration =
        |times: &mut Vec<Duration>| median(times) / u32::try_from(iterations).unwrap();
    Paired {
        iterations,
        rounds,
        baseline_per_iteration: per_iteration(&mut baseline_times),
        candidate_per_iteration: per_iteration(&mut candidate_times),
        ratio: quartiles(&mut ratios),
    }
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn quartiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_unstable_by(f64::total_cmp);
    let at = |q: usize| values[(values.len() - 1) * q / 4];
    [at(1), at(2), at(3)]
}
