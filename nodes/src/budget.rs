//! The memory budget for one operation's working set (`--max-memory`, and on a GPU its free memory):
//! the VAE decodes in smaller batches, then in tiles, when its estimated peak would not fit; and on a
//! device that runs out of memory anyway (the estimate is ComfyUI's, not a bound), it retries in
//! tiles, as ComfyUI does.

use std::cell::Cell;

thread_local! {
    /// Per thread, as the executor runs a graph on one thread (and tests run graphs side by side).
    static MAX_MEMORY: Cell<Option<u64>> = const { Cell::new(None) };
    static USE_FREE_MEMORY: Cell<bool> = const { Cell::new(true) };
}

/// Sets the budget in bytes for graphs run on this thread (None: no budget).
pub fn set_max_memory(bytes: Option<u64>) {
    MAX_MEMORY.with(|m| m.set(bytes.filter(|&b| b > 0)));
}

/// The budget in bytes, if one is set.
pub fn max_memory() -> Option<u64> {
    MAX_MEMORY.with(Cell::get)
}

/// Whether a GPU's free memory limits a decode on this thread (the default). Off, only the
/// out-of-memory retry does: the GPU check turns it off to reach that retry, which the estimate
/// otherwise heads off.
pub fn set_use_free_memory(on: bool) {
    USE_FREE_MEMORY.with(|m| m.set(on));
}

/// Whether a GPU's free memory limits a decode on this thread.
pub fn use_free_memory() -> bool {
    USE_FREE_MEMORY.with(Cell::get)
}

/// Whether a caught panic or error message is libtorch running out of memory.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("not enough memory") || m.contains("failed to allocate")
}
