//! A caller's mistake is the same typed error on either executor: each case
//! drives one op with bad shapes on the GPU and on the reference and compares
//! the errors (the checks live once, in `ops::check`).

mod common;

use half::f16;
use kvsieve::ops::prelude::*;
use kvsieve::reference::RefExecutor;
use kvsieve::Error;

/// The error `case` returns on executor `E`, rendered.
fn err<E: Ops>(ex: &mut E, case: &dyn Fn(&mut E) -> kvsieve::Result<()>) -> String {
    match case(ex) {
        Err(e @ Error::Shape { .. }) => e.to_string(),
        other => panic!("{}: expected a shape error, got {other:?}", ex.name()),
    }
}

fn h(n: usize) -> Vec<f16> {
    vec![f16::from_f32(0.5); n]
}

/// One op call with bad shapes.
type Case<E> = Box<dyn Fn(&mut E) -> kvsieve::Result<()>>;

/// Bad-shape cases, generic over the executor.
fn cases<E: Ops>() -> Vec<(&'static str, Case<E>)> {
    vec![
        (
            "matmul inner dims",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 12), 3, 12)?);
                let mut y = ex.tensor(2, 3)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "matmul in-dim not a multiple of 4",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 6)?, ex.weight(&h(3 * 6), 3, 6)?);
                let mut y = ex.tensor(2, 3)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "matmul output shape",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let mut y = ex.tensor(2, 4)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "weight odd columns",
            Box::new(|ex: &mut E| ex.weight(&h(3 * 5), 3, 5).map(|_| ())),
        ),
        (
            "weight value count",
            Box::new(|ex: &mut E| ex.weight(&h(7), 2, 4).map(|_| ())),
        ),
        (
            "ts_vote zero heads",
            Box::new(|ex: &mut E| {
                let s = ex.tensor(4, 64)?;
                let mut y = ex.tensor(1, 64)?;
                ex.ts_vote(&s, 0, 64, &mut y, None)
            }),
        ),
        (
            "ts_vote scores too small",
            Box::new(|ex: &mut E| {
                let s = ex.tensor(4, 64)?;
                let mut y = ex.tensor(1, 64)?;
                ex.ts_vote(&s, 8, 64, &mut y, None)
            }),
        ),
        (
            "rms_norm weight width",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(4), 1, 4)?);
                let mut y = ex.tensor(2, 8)?;
                ex.rms_norm(&x, &w, 1e-5, &mut y)
            }),
        ),
        (
            "add shapes",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(3, 8)?;
                ex.add(&mut y, &x)
            }),
        ),
        (
            "copy_rows past the end",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(2, 8)?;
                ex.copy_rows(&x, 1, &mut y, 0, 2)
            }),
        ),
    ]
}

#[test]
fn bad_shapes_are_the_same_error_on_both_executors() {
    let mut gpu = common::gpu();
    let mut cpu = RefExecutor::new();
    let (g, c) = (cases(), cases());
    for ((name, on_gpu), (_, on_cpu)) in g.iter().zip(c.iter()) {
        let a = err(&mut gpu, on_gpu.as_ref());
        let b = err(&mut cpu, on_cpu.as_ref());
        assert_eq!(a, b, "{name}: the executors disagree");
    }
}
