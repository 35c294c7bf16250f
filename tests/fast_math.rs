//! The fast path's vectorised elementwise functions (`cpu::fast::math`) against f64, over dense
//! grids and at their edges, and the fast activations against the f64 reference.

use bert_adapters::cpu::{fast, reference};
use bert_adapters::Activation;
use fast::math;

fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    (0..=n).map(|i| lo + (hi - lo) * i as f32 / n as f32).collect()
}

#[test]
fn exp_is_within_two_ulp_and_handles_the_edges() {
    let mut worst = 0f64;
    for x in grid(-87.0, 88.5, 400_000) {
        let want = (x as f64).exp();
        let rel = ((math::exp(x) as f64 - want) / want).abs();
        worst = worst.max(rel);
    }
    assert!(worst < 2.5e-7, "exp: worst relative error {worst:e}");
    assert_eq!(math::exp(0.0), 1.0);
    assert_eq!(math::exp(-90.0), 0.0);
    assert_eq!(math::exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(math::exp(89.0), f32::INFINITY);
    assert_eq!(math::exp(f32::INFINITY), f32::INFINITY);
    assert!(math::exp(f32::NAN).is_nan());
    // The top of the range: finite, and right.
    let (top, want) = (math::exp(88.72), (88.72f32 as f64).exp());
    assert!(top.is_finite() && ((top as f64 - want) / want).abs() < 2.5e-7);
}

#[test]
fn gelu_and_its_derivative_match_f64_in_both_tails() {
    let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    let (mut worst_y, mut worst_d) = (0f64, 0f64);
    for x in grid(-15.0, 15.0, 300_000) {
        let xd = x as f64;
        let y = xd * phi(xd);
        let d = phi(xd) + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
        // The documented bound: absolute error ≤ 3e-7·|x| (x·Φ(x) with Φ off by ≤ 3e-7).
        worst_y = worst_y.max((math::gelu(x) as f64 - y).abs() / xd.abs().max(1e-6));
        worst_d = worst_d.max((math::gelu_grad(x) as f64 - d).abs() / xd.abs().max(1.0));
    }
    assert!(worst_y < 5e-7, "gelu: worst scaled error {worst_y:e}");
    assert!(worst_d < 5e-7, "gelu': worst scaled error {worst_d:e}");
    // The negative tail is small but not flushed: GELU(-5) = -5·Φ(-5) ≈ -1.43e-6, to 1e-6 relative.
    let want = -5.0 * phi(-5.0);
    assert!(((math::gelu(-5.0) as f64 - want) / want).abs() < 1e-6);
    assert_eq!(math::gelu(0.0), 0.0);
    assert_eq!(math::gelu(f32::INFINITY), f32::INFINITY);
    assert!(math::gelu(f32::NAN).is_nan() && math::gelu_grad(f32::NAN).is_nan());
}

#[test]
fn sigmoid_matches_f64() {
    for x in grid(-80.0, 80.0, 100_000) {
        let want = 1.0 / (1.0 + (-(x as f64)).exp());
        assert!((math::sigmoid(x) as f64 - want).abs() <= 3e-7 * want + 1e-38, "sigmoid({x})");
    }
}

/// The fused forms (`*_with::<true>`, what the AVX2+FMA clone of a kernel runs) meet the same
/// bounds as the plain ones, and `fast::activation` (whichever clone this CPU picks) does too.
#[test]
fn fused_forms_and_the_kernels_meet_the_same_bounds() {
    let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    let xs = grid(-15.0, 15.0, 100_003);
    let kernel = fast::activation(&xs, Activation::Gelu);
    let ones = vec![1f32; xs.len()];
    let kernel_grad = fast::activation_backward(&ones, &xs, Activation::Gelu);
    for (i, &x) in xs.iter().enumerate() {
        let xd = x as f64;
        let y = xd * phi(xd);
        let d = phi(xd) + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for (what, got) in [("gelu_with::<true>", math::gelu_with::<true>(x)), ("fast::activation", kernel[i])] {
            assert!((got as f64 - y).abs() <= 5e-7 * xd.abs().max(1e-6), "{what}({x}) = {got}, want {y}");
        }
        for (what, got) in [("gelu_grad_with::<true>", math::gelu_grad_with::<true>(x)), ("fast::activation_backward", kernel_grad[i])] {
            assert!((got as f64 - d).abs() <= 5e-7 * xd.abs().max(1.0), "{what}({x}) = {got}, want {d}");
        }
    }
    for x in grid(-87.0, 88.5, 100_000) {
        let want = (x as f64).exp();
        assert!(((math::exp_with::<true>(x) as f64 - want) / want).abs() < 2.5e-7, "exp_with::<true>({x})");
    }
    assert_eq!(math::exp_with::<true>(-90.0), 0.0);
    assert_eq!(math::exp_with::<true>(89.0), f32::INFINITY);
    assert!(math::exp_with::<true>(f32::NAN).is_nan() && math::gelu_with::<true>(f32::NAN).is_nan());
}

#[test]
fn fast_activations_and_gradients_match_the_reference() {
    let x: Vec<f32> = grid(-9.0, 9.0, 70_001);
    let dy: Vec<f32> = x.iter().map(|v| (v * 1.7).sin() * 3.0).collect();
    for act in [Activation::Gelu, Activation::GeluNew, Activation::Relu, Activation::Swish, Activation::Tanh, Activation::Sigmoid] {
        let (want, got) = (reference::activation(&x, act), fast::activation(&x, act));
        let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5 * (1.0 + 9.0), "{act:?} forward: {err:e}");
        let (want, got) = (reference::activation_backward(&dy, &x, act), fast::activation_backward(&dy, &x, act));
        let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5 * (1.0 + 3.0), "{act:?} backward: {err:e}");
    }
}
