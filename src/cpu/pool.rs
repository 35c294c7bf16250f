//! Output buffers of the CPU ops from the backend's `HostPool` (what a device caching allocator
//! is to device memory): a simple op runs inside `Scope`, and its kernel takes the output it
//! returns from `buffer`, so the tensor that wraps it (`Tensor::from_pool`) gives it back when
//! dropped. Kernels called outside a scope (the temporaries inside the adapter and NICE ops,
//! scratch that a device kernel keeps in registers or a workspace) allocate as before.

use std::cell::RefCell;
use std::sync::Arc;

use crate::tensor::HostPool;

thread_local! {
    static CURRENT: RefCell<Option<Arc<HostPool>>> = const { RefCell::new(None) };
}

/// An output buffer of `n` elements that the caller overwrites entirely (its contents are
/// unspecified when it comes from the pool: zeroing it would be a wasted pass over memory).
pub(crate) fn buffer(n: usize) -> Vec<f32> {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(pool) => pool.take(n),
        None => vec![0f32; n],
    })
}

/// Makes `pool` the output pool of this thread until dropped (restoring the previous one).
pub(crate) struct Scope(Option<Arc<HostPool>>);

impl Scope {
    pub(crate) fn enter(pool: &Arc<HostPool>) -> Self {
        Scope(CURRENT.with(|c| c.replace(Some(pool.clone()))))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}
