//! Following a run as it happens (what `diffloom serve` turns into ComfyUI's WebSocket messages): the
//! nodes served from the cache, the node running, its progress, and what it produced.

use serde_json::Value as Json;

/// Called from the executor's thread while it runs; every method defaults to nothing.
pub trait Observer: Send + Sync {
    /// The needed nodes whose results come from the cache, before anything runs.
    fn cached(&self, _ids: &[&str]) {}
    /// Node `id` starts running.
    fn executing(&self, _id: &str) {}
    /// Node `id` has done `value` of `max` steps (sampling).
    fn progress(&self, _id: &str, _value: u64, _max: u64) {}
    /// Whether [`Observer::preview`] should be called (it costs a copy of the latent per step).
    fn wants_previews(&self) -> bool {
        false
    }
    /// Node `id`'s current denoised estimate, `[batch, channels, h, w]` in the model's latent scale.
    fn preview(&self, _id: &str, _latent: &tch::Tensor) {}
    /// Node `id` finished; `ui` is what it shows (ComfyUI's `{"images": [{filename, subfolder, type}]}`),
    /// empty for most nodes.
    fn executed(&self, _id: &str, _ui: &serde_json::Map<String, Json>) {}
}
