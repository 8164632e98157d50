use crate::Result;
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::error;

// verimail: the I/O loop is a task on the runtime, not a thread: its handle is
// the receiving end of the result it sends when it ends.
pub(crate) struct JoinHandle(flume::Receiver<Result<()>>);

impl JoinHandle {
    pub(crate) fn new(result: flume::Receiver<Result<()>>) -> Self {
        Self(result)
    }
}
type Inner = Option<JoinHandle>;

#[derive(Clone)]
pub(crate) struct ThreadHandle(Arc<Mutex<Inner>>);

impl Default for ThreadHandle {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }
}

impl ThreadHandle {
    pub(crate) fn register(&self, handle: JoinHandle) {
        *self.lock_inner() = Some(handle);
    }

    fn take(&self) -> Option<JoinHandle> {
        self.lock_inner().take()
    }

    // verimail: waits for the loop task's result; a task dropped with its
    // runtime sends none, and the loop is then over as well.
    pub(crate) fn wait(&self, context: &'static str) -> Result<()> {
        if let Some(handle) = self.take() {
            match handle.0.recv() {
                Ok(res) => return res,
                Err(_) => error!(%context, "ended without a result"),
            }
        }
        Ok(())
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
