//! The demo's model and data: a one-hidden-layer MLP classifier on the UCI 8x8
//! handwritten digits (shipped inside `smartcore`), with forward and backward passes
//! written out on flat buffers so gradients go straight into the optimizer.

use colony_optim::Layout;

/// Pixels per image.
pub(crate) const INPUTS: usize = 64;
/// Digit classes.
pub(crate) const CLASSES: usize = 10;

/// The digits, split once (deterministically) into training and held-out sets.
#[derive(Debug, Clone)]
pub(crate) struct Digits {
    /// Training images, row-major `[n, 64]`, scaled to `[0, 1]`.
    pub(crate) train_x: Vec<f32>,
    /// Training labels.
    pub(crate) train_y: Vec<u8>,
    /// Held-out images.
    pub(crate) test_x: Vec<f32>,
    /// Held-out labels.
    pub(crate) test_y: Vec<u8>,
}

/// A small deterministic generator (xorshift64*), so every peer draws the same numbers.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

impl Digits {
    /// Loads the 1 797 digits and holds out `test_fraction` of them (shuffled with `seed`).
    pub(crate) fn load(test_fraction: f64, seed: u64) -> anyhow::Result<Self> {
        let data = smartcore::dataset::digits::load_dataset();
        anyhow::ensure!(
            data.num_features == INPUTS && data.data.len() == data.num_samples * INPUTS,
            "unexpected digits layout"
        );
        let mut order: Vec<usize> = (0..data.num_samples).collect();
        Rng::new(seed).shuffle(&mut order);
        let n_test = ((data.num_samples as f64) * test_fraction).round() as usize;
        let mut out = Self {
            train_x: vec![],
            train_y: vec![],
            test_x: vec![],
            test_y: vec![],
        };
        for (rank, &i) in order.iter().enumerate() {
            let label = data.target[i];
            anyhow::ensure!((0.0..10.0).contains(&label), "bad label {label}");
            let (xs, ys) = if rank < n_test {
                (&mut out.test_x, &mut out.test_y)
            } else {
                (&mut out.train_x, &mut out.train_y)
            };
            xs.extend(
                data.data[i * INPUTS..(i + 1) * INPUTS]
                    .iter()
                    .map(|v| v / 16.0),
            );
            ys.push(label as u8);
        }
        Ok(out)
    }

    /// Training samples.
    pub(crate) fn train_len(&self) -> usize {
        self.train_y.len()
    }

    /// The indices of training shard `shard` of `shards` (every `shards`-th sample).
    pub(crate) fn shard(&self, shard: usize, shards: usize) -> Vec<usize> {
        (shard..self.train_len()).step_by(shards.max(1)).collect()
    }

    /// Copies the training samples `idx` into a batch.
    pub(crate) fn batch(&self, idx: &[usize]) -> (Vec<f32>, Vec<u8>) {
        let mut x = Vec::with_capacity(idx.len() * INPUTS);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(&self.train_x[i * INPUTS..(i + 1) * INPUTS]);
            y.push(self.train_y[i]);
        }
        (x, y)
    }
}

/// A 64 → `hidden` (ReLU) → 10 classifier whose parameters are one flat buffer laid out
/// as `w1 [hidden, 64]`, `b1 [hidden]`, `w2 [10, hidden]`, `b2 [10]`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    hidden: usize,
}

impl Mlp {
    pub(crate) fn new(hidden: usize) -> Self {
        Self { hidden }
    }

    /// The parameter layout (for LAMB's per-tensor trust ratios).
    pub(crate) fn layout(&self) -> anyhow::Result<Layout> {
        let h = self.hidden;
        Ok(Layout::packed(
            [
                ("w1", vec![h, INPUTS]),
                ("b1", vec![h]),
                ("w2", vec![CLASSES, h]),
                ("b2", vec![CLASSES]),
            ],
            1,
        )?)
    }

    pub(crate) fn num_params(&self) -> usize {
        self.hidden * INPUTS + self.hidden + CLASSES * self.hidden + CLASSES
    }

    /// Initial parameters: uniform in `±1/sqrt(fan_in)` from `seed` (biases zero), the
    /// same on every peer that uses the same seed.
    pub(crate) fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let h = self.hidden;
        let mut p = vec![0.0; self.num_params()];
        let b1 = 1.0 / (INPUTS as f32).sqrt();
        let b2 = 1.0 / (h as f32).sqrt();
        for v in &mut p[..h * INPUTS] {
            *v = (2.0 * rng.uniform() - 1.0) * b1;
        }
        let w2 = h * INPUTS + h;
        for v in &mut p[w2..w2 + CLASSES * h] {
            *v = (2.0 * rng.uniform() - 1.0) * b2;
        }
        p
    }

    fn split<'a>(&self, p: &'a [f32]) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
        let h = self.hidden;
        let (w1, rest) = p.split_at(h * INPUTS);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(CLASSES * h);
        (w1, b1, w2, b2)
    }

    fn logits(&self, p: &[f32], x: &[f32], hidden: &mut [f32], out: &mut [f32; CLASSES]) {
        let (w1, b1, w2, b2) = self.split(p);
        for (j, hj) in hidden.iter_mut().enumerate() {
            let row = &w1[j * INPUTS..(j + 1) * INPUTS];
            let z: f32 = b1[j] + row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
            *hj = z.max(0.0);
        }
        for (k, ok) in out.iter_mut().enumerate() {
            let row = &w2[k * self.hidden..(k + 1) * self.hidden];
            *ok = b2[k]
                + row
                    .iter()
                    .zip(hidden.iter())
                    .map(|(a, b)| a * b)
                    .sum::<f32>();
        }
    }

    /// Mean cross-entropy over the batch; writes its gradient into `grads`.
    pub(crate) fn loss_and_grad(&self, p: &[f32], x: &[f32], y: &[u8], grads: &mut [f32]) -> f32 {
        grads.fill(0.0);
        let h = self.hidden;
        let n = y.len().max(1) as f32;
        let mut hidden = vec![0.0; h];
        let mut logits = [0.0; CLASSES];
        let mut loss = 0.0;
        let (_, _, w2, _) = self.split(p);
        let w2 = w2.to_vec();
        for (i, &label) in y.iter().enumerate() {
            let xi = &x[i * INPUTS..(i + 1) * INPUTS];
            self.logits(p, xi, &mut hidden, &mut logits);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            loss += -((exp[label as usize] / sum).max(1e-30)).ln();
            let (gw1, rest) = grads.split_at_mut(h * INPUTS);
            let (gb1, rest) = rest.split_at_mut(h);
            let (gw2, gb2) = rest.split_at_mut(CLASSES * h);
            let mut dhidden = vec![0.0f32; h];
            for k in 0..CLASSES {
                let d = (exp[k] / sum - if k == label as usize { 1.0 } else { 0.0 }) / n;
                gb2[k] += d;
                for j in 0..h {
                    gw2[k * h + j] += d * hidden[j];
                    dhidden[j] += d * w2[k * h + j];
                }
            }
            for j in 0..h {
                if hidden[j] <= 0.0 {
                    continue;
                }
                let d = dhidden[j];
                gb1[j] += d;
                for (g, xv) in gw1[j * INPUTS..(j + 1) * INPUTS].iter_mut().zip(xi) {
                    *g += d * xv;
                }
            }
        }
        loss / n
    }

    /// Fraction of `(x, y)` classified correctly.
    pub(crate) fn accuracy(&self, p: &[f32], x: &[f32], y: &[u8]) -> f64 {
        let mut hidden = vec![0.0; self.hidden];
        let mut logits = [0.0; CLASSES];
        let correct = y
            .iter()
            .enumerate()
            .filter(|&(i, &label)| {
                self.logits(
                    p,
                    &x[i * INPUTS..(i + 1) * INPUTS],
                    &mut hidden,
                    &mut logits,
                );
                let best = (0..CLASSES)
                    .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                    .unwrap_or(0);
                best == label as usize
            })
            .count();
        correct as f64 / y.len().max(1) as f64
    }
}

/// SHA-256 of the parameters' bytes (little-endian f32), hex: equal hashes mean
/// bit-identical parameters.
pub(crate) fn params_hash(p: &[f32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for v in p {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use colony_optim::{LocalOptimizer, LocalOptimizerKind, Sgd};

    use super::*;

    #[test]
    fn digits_load_and_split_deterministically() {
        let a = Digits::load(0.2, 7).unwrap();
        let b = Digits::load(0.2, 7).unwrap();
        assert_eq!(a.test_y.len(), 359);
        assert_eq!(a.train_len() + a.test_y.len(), 1797);
        assert_eq!(a.train_y, b.train_y);
        assert!(a.train_x.iter().all(|v| (0.0..=1.0).contains(v)));
        let shards: usize = (0..4).map(|s| a.shard(s, 4).len()).sum();
        assert_eq!(shards, a.train_len());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mlp = Mlp::new(8);
        let p = mlp.init(3);
        let d = Digits::load(0.2, 1).unwrap();
        let (x, y) = d.batch(&[0, 1, 2, 3]);
        let mut g = vec![0.0; p.len()];
        mlp.loss_and_grad(&p, &x, &y, &mut g);
        let mut scratch = vec![0.0; p.len()];
        for &i in &[0usize, 5, 8 * 64 + 2, 8 * 64 + 8 + 13, p.len() - 1] {
            let eps = 1e-2;
            let mut plus = p.clone();
            plus[i] += eps;
            let mut minus = p.clone();
            minus[i] -= eps;
            let numeric = (mlp.loss_and_grad(&plus, &x, &y, &mut scratch)
                - mlp.loss_and_grad(&minus, &x, &y, &mut scratch))
                / (2.0 * eps);
            assert!(
                (numeric - g[i]).abs() < 2e-3,
                "param {i}: {numeric} vs {}",
                g[i]
            );
        }
    }

    /// The demo's recipe in one process: the accuracy the swarm must reach is reachable
    /// with the same number of samples.
    #[test]
    fn single_process_training_reaches_the_demo_accuracy() {
        let d = Digits::load(0.2, 0).unwrap();
        let mlp = Mlp::new(64);
        let mut p = mlp.init(42);
        let hp = Sgd {
            momentum: 0.9,
            ..Sgd::default()
        };
        let mut opt =
            LocalOptimizer::new(LocalOptimizerKind::Sgd(hp), mlp.layout().unwrap()).unwrap();
        let mut g = vec![0.0; p.len()];
        let mut rng = Rng::new(5);
        for step in 0..80 {
            let idx: Vec<usize> = (0..256).map(|_| rng.below(d.train_len())).collect();
            let (x, y) = d.batch(&idx);
            mlp.loss_and_grad(&p, &x, &y, &mut g);
            opt.step(&mut p, &g, 0.3, step).unwrap();
        }
        let acc = mlp.accuracy(&p, &d.test_x, &d.test_y);
        assert!(acc >= 0.95, "accuracy {acc}");
    }
}
