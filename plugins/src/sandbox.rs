//! What a plugin's Lua state may do: the table, string, math, utf8 and coroutine libraries only (no
//! io, os, package/require, debug), text-only `load` (no bytecode), no `string.dump`, a memory limit per
//! state and an instruction/time limit per call.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, LuaOptions, StdLib, VmState};

/// Memory a plugin's Lua state may allocate (tensors live in libtorch and do not count).
pub const MEMORY_LIMIT: usize = 256 << 20;
/// Lua instructions one call (loading the file, or one execute) may run.
pub const INSTRUCTION_LIMIT: u64 = 500_000_000;
/// Wall time one call may take.
pub const TIME_LIMIT: Duration = Duration::from_secs(30);
/// Instructions between two checks of the limits.
const CHECK_EVERY: u32 = 10_000;

/// The budget of the call in progress, reset before each call.
#[derive(Clone)]
pub struct Budget {
    executed: Rc<Cell<u64>>,
    started: Rc<Cell<Instant>>,
}

impl Budget {
    pub fn reset(&self) {
        self.executed.set(0);
        self.started.set(Instant::now());
    }
}

/// A new Lua state with the sandbox applied; the returned budget governs its calls.
pub fn new_state() -> mlua::Result<(Lua, Budget)> {
    let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    lua.set_memory_limit(MEMORY_LIMIT)?;
    let budget = Budget { executed: Rc::new(Cell::new(0)), started: Rc::new(Cell::new(Instant::now())) };
    let b = budget.clone();
    lua.set_hook(HookTriggers::new().every_nth_instruction(CHECK_EVERY), move |_, _| {
        b.executed.set(b.executed.get() + u64::from(CHECK_EVERY));
        if b.executed.get() > INSTRUCTION_LIMIT {
            return Err(mlua::Error::RuntimeError(format!("the plugin exceeded its limit of {INSTRUCTION_LIMIT} Lua instructions per call")));
        }
        if b.started.get().elapsed() > TIME_LIMIT {
            return Err(mlua::Error::RuntimeError(format!("the plugin exceeded its time limit of {} s per call", TIME_LIMIT.as_secs())));
        }
        Ok(VmState::Continue)
    })?;
    // Loading code from strings stays possible, but only as text: precompiled bytecode can break out
    // of the VM's checks.
    lua.load(
        r##"
        local raw_load = load
        load = function(chunk, name, mode, ...)
            -- An explicit nil environment would be taken as "no globals": pass it only when given.
            if select("#", ...) == 0 then
                return raw_load(chunk, name, "t")
            end
            return raw_load(chunk, name, "t", ...)
        end
        dofile, loadfile, require, collectgarbage = nil, nil, nil, nil
        string.dump = nil
        "##,
    )
    .set_name("=sandbox")
    .exec()?;
    Ok((lua, budget))
}
