//! Small building blocks: convolutions (dense / depthwise / pointwise), BatchNorm, activations.
//!
//! Tensor names follow PyTorch (`weight`, `bias`, `running_mean`, `running_var`) so timm and
//! torchvision checkpoints load by name.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

use crate::ops::channel::{batch_norm_train, channel_affine, channel_bias, hard_swish, relu};
use crate::ops::fused::{self, BnRef, Id, PlanBuilder};
use crate::ops::{conv2d_im2col, depthwise_conv2d};

pub use crate::ops::channel::hard_sigmoid;

/// torchvision's MobileNetV3 init for conv weights: Kaiming-normal, fan_out, ReLU gain.
pub const KAIMING_NORMAL_FAN_OUT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// torchvision's FPN init: `kaiming_uniform_(a=1)` (fan_in, gain 1).
pub const KAIMING_UNIFORM_A1: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::Linear,
};

/// PyTorch's default `nn.Conv2d` init (`kaiming_uniform_(a=√5)`): U(±1/√fan_in), for weight
/// and bias.
pub fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// im2col + gemm ([`conv2d_im2col`] on CPU; candle's `conv2d` elsewhere, whose stride-2
    /// backward needs H and W of equal parity).
    Dense,
    /// `groups = C`: [`depthwise_conv2d`] (direct kernel on CPU).
    Depthwise,
    /// 1×1 stride 1 as a matmul `(O,C) · (B,C,H·W)`: both gradients are gemms too.
    Pointwise,
}

/// A 2-D convolution with square kernel and symmetric padding `k/2`.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    kind: ConvKind,
}

impl Conv {
    /// Weight `(out, in/groups, k, k)` at `vb.weight`, optional bias `(out,)` at `vb.bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        kind: ConvKind,
        bias: bool,
        init: Init,
        bias_init: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        let per_group_in = if kind == ConvKind::Depthwise { 1 } else { c_in };
        if kind == ConvKind::Depthwise && c_in != c_out {
            candle_core::bail!("depthwise conv needs c_in == c_out, got {c_in} -> {c_out}")
        }
        if kind == ConvKind::Pointwise && (k != 1 || stride != 1) {
            candle_core::bail!("pointwise conv is 1x1 stride 1, got k{k} s{stride}")
        }
        let weight = vb.get_with_hints((c_out, per_group_in, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(c_out, "bias", bias_init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            kind,
        })
    }
}

impl Conv {
    /// This conv as a step of a fused plan (see [`crate::ops::fused`]).
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id) -> Result<Id> {
        let k = self.weight.dim(2)?;
        let kind = match self.kind {
            ConvKind::Pointwise => fused::ConvKind::Pointwise,
            ConvKind::Dense => fused::ConvKind::Dense {
                k,
                stride: self.stride,
            },
            ConvKind::Depthwise => fused::ConvKind::Depthwise {
                k,
                stride: self.stride,
            },
        };
        pb.conv(x, &self.weight, self.bias.as_ref(), kind)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Conv {
    /// `(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let y = match self.kind {
            ConvKind::Dense => conv2d_im2col(x, &self.weight, self.stride, k / 2)?,
            ConvKind::Depthwise => depthwise_conv2d(x, &self.weight, self.stride, k / 2)?,
            ConvKind::Pointwise => {
                let (b, c, h, w) = x.dims4()?;
                let o = self.weight.dim(0)?;
                let w2 = self.weight.reshape((o, c))?;
                w2.broadcast_matmul(&x.reshape((b, c, h * w))?)?
                    .reshape((b, o, h, w))?
            }
        };
        match &self.bias {
            None => Ok(y),
            // Fused per-channel add: candle's broadcast_add is slow on CPU.
            Some(bias) => channel_bias(&y, bias),
        }
    }
}

/// BatchNorm2d as in timm/PyTorch: eps 1e-5, momentum 0.1, affine. Running statistics are
/// Vars named `running_mean` / `running_var`, updated in training mode (unbiased variance, as
/// PyTorch) and used in eval mode.
///
/// Not `candle_nn::BatchNorm`: its training path transposes and copies the input and runs
/// about ten broadcast ops, each slow on CPU. Here: one fused statistics pass and one fused
/// per-channel affine pass, both with direct backward kernels (see `ops::channel`).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            // Shares storage with the VarMap's variable (it is one already).
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// `act(BN(x))` as a step of a fused plan; `train` as in `forward_t`.
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id, train: bool, act: Act) -> Id {
        let bn = BnRef {
            running_mean: self.running_mean.clone(),
            running_var: self.running_var.clone(),
            eps: self.eps,
            momentum: self.momentum,
            train,
        };
        pb.bn_act(x, &self.weight, &self.bias, bn, act.fused())
    }
}

impl ModuleT for BatchNorm2d {
    /// `(B, C, H, W) -> (B, C, H, W)`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let (y, mean, var) = batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
            let m = (x.elem_count() / x.dim(1)?) as f64;
            let k = self.momentum;
            let unbiased = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
            let rm = ((self.running_mean.as_detached_tensor() * (1.0 - k))? + (mean * k)?)?;
            let rv =
                ((self.running_var.as_detached_tensor() * (1.0 - k))? + (var * (k * unbiased))?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            return Ok(y);
        }
        let mean = self.running_mean.as_detached_tensor();
        let var = self.running_var.as_detached_tensor();
        let scale = (&self.weight * (var + self.eps)?.sqrt()?.recip()?)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        channel_affine(x, &scale, &shift)
    }
}

/// [`BatchNorm2d`] at `vb` (`weight`, `bias`, `running_mean`, `running_var`).
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    BatchNorm2d::new(c, vb)
}

/// Activations of MobileNetV3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    HardSwish,
}

impl Act {
    /// The same activation in the fused executor.
    pub fn fused(self) -> fused::Act {
        match self {
            Act::None => fused::Act::None,
            Act::Relu => fused::Act::Relu,
            Act::HardSwish => fused::Act::HardSwish,
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x.clone()),
            Act::Relu => relu(x),
            Act::HardSwish => hard_swish(x),
        }
    }
}

/// conv → BN → activation, the unit every block is made of.
#[derive(Debug, Clone)]
pub struct ConvBnAct {
    conv: Conv,
    bn: BatchNorm2d,
    act: Act,
}

impl ConvBnAct {
    pub fn new(conv: Conv, bn: BatchNorm2d, act: Act) -> Self {
        Self { conv, bn, act }
    }
}

impl ConvBnAct {
    /// conv → BN → act as steps of a fused plan.
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id, train: bool) -> Result<Id> {
        let y = self.conv.plan(pb, x)?;
        Ok(self.bn.plan(pb, y, train, self.act))
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let y = self.bn.forward_t(&y, train)?;
        self.act.apply(&y)
    }
}
