//! Framework adapter for candle (feature `candle`): gradients in from candle's backward
//! pass, parameters out after a step.

use candle_core::{DType, Tensor, Var, backprop::GradStore};
use candle_nn::VarMap;
use colony_kernels::Layout;

use crate::error::{OptimError, Result};

fn candle_err(op: &'static str) -> impl Fn(candle_core::Error) -> OptimError {
    move |source| OptimError::Candle { op, source }
}

/// A candle model's trainable variables in a fixed order (sorted by name), mapped onto
/// one flat `f32` buffer with a [`Layout`].
///
/// # Examples
/// ```ignore
/// let params = CandleParams::from_varmap(&varmap)?;
/// let mut opt = CollaborativeOptimizer::new(config, params.read_params()?, local, board, averager, None).await?;
/// loop {
///     let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
///     params.read_grads(&loss.backward()?, opt.grads_mut())?;
///     opt.step(Some(batch)).await?;
///     params.write_params(opt.params())?;
/// }
/// ```
#[derive(Debug)]
pub struct CandleParams {
    vars: Vec<(String, Var)>,
    layout: Layout,
}

impl CandleParams {
    /// All variables of `varmap`, sorted by name (so every peer agrees on the order).
    ///
    /// # Errors
    /// [`OptimError::NotF32`] if a variable is not `f32`.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(data);
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_vars(vars)
    }

    /// The given variables, in the given order.
    ///
    /// # Errors
    /// [`OptimError::NotF32`] if a variable is not `f32`, [`OptimError::Kernel`] if the
    /// layout cannot be built.
    pub fn from_vars(vars: Vec<(String, Var)>) -> Result<Self> {
        if let Some((name, var)) = vars.iter().find(|(_, v)| v.dtype() != DType::F32) {
            return Err(OptimError::NotF32 {
                name: name.clone(),
                dtype: format!("{:?}", var.dtype()),
            });
        }
        let layout = Layout::packed(vars.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())), 1)?;
        Ok(Self { vars, layout })
    }

    /// The flat layout (names, shapes, offsets), e.g. for LAMB.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.total_len()
    }

    fn check(&self, what: &'static str, len: usize) -> Result<()> {
        if len == self.num_params() {
            Ok(())
        } else {
            Err(OptimError::LengthMismatch {
                what,
                expected: self.num_params(),
                actual: len,
            })
        }
    }

    /// The model's current parameters, flat.
    ///
    /// # Errors
    /// [`OptimError::Candle`] on a candle error.
    pub fn read_params(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.num_params()];
        for ((_, var), entry) in self.vars.iter().zip(self.layout.tensors()) {
            let values = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle_err("read parameters"))?;
            out[entry.range()].copy_from_slice(&values);
        }
        Ok(out)
    }

    /// Copies the gradients of `grads` (from `loss.backward()`) into `out`; a variable the
    /// loss does not depend on gets zeros.
    ///
    /// # Errors
    /// [`OptimError::LengthMismatch`] or [`OptimError::Candle`].
    pub fn read_grads(&self, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        self.check("gradients", out.len())?;
        for ((_, var), entry) in self.vars.iter().zip(self.layout.tensors()) {
            let dst = &mut out[entry.range()];
            match grads.get(var.as_tensor()) {
                Some(g) => {
                    let values = g
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(candle_err("read gradients"))?;
                    dst.copy_from_slice(&values);
                }
                None => dst.fill(0.0),
            }
        }
        Ok(())
    }

    /// Writes flat `params` back into the model's variables.
    ///
    /// # Errors
    /// [`OptimError::LengthMismatch`] or [`OptimError::Candle`].
    pub fn write_params(&self, params: &[f32]) -> Result<()> {
        self.check("parameters", params.len())?;
        for ((_, var), entry) in self.vars.iter().zip(self.layout.tensors()) {
            let t = Tensor::from_slice(&params[entry.range()], var.dims(), var.device())
                .map_err(candle_err("build a parameter tensor"))?;
            var.set(&t).map_err(candle_err("write parameters"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};
    use candle_nn::{VarBuilder, linear};

    use super::*;
    use crate::{LocalOptimizer, LocalOptimizerKind};

    #[test]
    fn a_candle_model_trains_through_flat_buffers() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = linear(3, 1, vb.pp("fc")).unwrap();
        let params = CandleParams::from_varmap(&varmap).unwrap();
        assert_eq!(params.num_params(), 4);
        let names: Vec<&str> = params.layout().tensors().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);

        let x = Tensor::new(
            &[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.], [1., 1., 1.]],
            &dev,
        )
        .unwrap();
        let y = Tensor::new(&[[1f32], [2.], [3.], [6.]], &dev).unwrap();
        let sgd = colony_kernels::Sgd {
            momentum: 0.0,
            ..Default::default()
        };
        let mut opt =
            LocalOptimizer::new(LocalOptimizerKind::Sgd(sgd), params.layout().clone()).unwrap();
        let mut flat = params.read_params().unwrap();
        let mut grads = vec![0.0; 4];
        let loss_at = |m: &candle_nn::Linear| {
            m.forward(&x)
                .unwrap()
                .sub(&y)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let first = loss_at(&model).to_scalar::<f32>().unwrap();
        for step in 0..200 {
            let loss = loss_at(&model);
            params
                .read_grads(&loss.backward().unwrap(), &mut grads)
                .unwrap();
            opt.step(&mut flat, &grads, 0.1, step).unwrap();
            params.write_params(&flat).unwrap();
        }
        let last = loss_at(&model).to_scalar::<f32>().unwrap();
        assert!(last < 1e-3 && last < first, "{first} -> {last}");
        assert_eq!(params.read_params().unwrap(), flat);
        assert!(params.write_params(&[0.0; 3]).is_err());
    }
}
