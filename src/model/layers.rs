//! Small building blocks: convolutions (dense / depthwise / pointwise), BatchNorm, activations.
//!
//! Tensor names follow PyTorch (`weight`, `bias`, `running_mean`, `running_var`) so timm and
//! torchvision checkpoints load by name.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};

use crate::ops::depthwise_conv2d;

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
    /// candle's `conv2d` (im2col + gemm). Stride 2 only with even H and W (backward trap).
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

impl Module for Conv {
    /// `(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let y = match self.kind {
            ConvKind::Dense => x.conv2d(&self.weight, k / 2, self.stride, 1, 1)?,
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
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        }
    }
}

/// BatchNorm2d as in timm/PyTorch: eps 1e-5, momentum 0.1, affine; running stats are Vars
/// named `running_mean` / `running_var` (updated in training mode, used in eval mode).
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    candle_nn::batch_norm(
        c,
        BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        },
        vb,
    )
}

/// Activations of MobileNetV3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    HardSwish,
}

impl Act {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x.clone()),
            Act::Relu => x.relu(),
            Act::HardSwish => x * hard_sigmoid(x)?,
        }
    }
}

/// `relu6(x + 3) / 6`, as timm's `hard_sigmoid` and PyTorch's `Hardsigmoid`.
pub fn hard_sigmoid(x: &Tensor) -> Result<Tensor> {
    (x + 3.0)?.clamp(0f32, 6f32)? / 6.0
}

/// conv → BN → activation, the unit every block is made of.
#[derive(Debug, Clone)]
pub struct ConvBnAct {
    conv: Conv,
    bn: BatchNorm,
    act: Act,
}

impl ConvBnAct {
    pub fn new(conv: Conv, bn: BatchNorm, act: Act) -> Self {
        Self { conv, bn, act }
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let y = self.bn.forward_t(&y, train)?;
        self.act.apply(&y)
    }
}
