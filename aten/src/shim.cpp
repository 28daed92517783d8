// The libtorch calls tch does not bind, behind a C interface (see lib.rs for the Rust side).
//
// Tensors cross the boundary as tch does: a heap `at::Tensor*` that tch's `Tensor::from_ptr` owns.
// No C++ exception crosses it: every entry point catches and hands back the message as a malloc'd
// string, which the caller frees with dl_free_string.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/Version.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <c10/core/DeviceGuard.h>
#include <torch/headeronly/version.h>
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#include <c10/core/CachingDeviceAllocator.h>
#define DL_DEVICE_ALLOCATOR 1
#endif

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

char *dup(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

template <typename F>
auto guarded(char **err, F f) -> decltype(f()) {
  *err = nullptr;
  try {
    return f();
  } catch (const c10::Error &e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception &e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return decltype(f())();
}

}  // namespace

extern "C" {

void dl_free_string(char *s) { std::free(s); }

// A new generator of its own on the device, seeded: what `torch.Generator(device).manual_seed(seed)`
// makes in Python. device_type: 0 CPU, 1 CUDA.
void *dl_generator_new(int device_type, int device_index, uint64_t seed, char **err) {
  return guarded(err, [&]() -> void * {
    at::Generator gen;
    if (device_type == 0) {
      gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    } else {
      gen = at::detail::getCUDAHooks().getNewGenerator(static_cast<c10::DeviceIndex>(device_index));
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_current_seed(seed);
    }
    return new at::Generator(std::move(gen));
  });
}

void dl_generator_free(void *gen) { delete static_cast<at::Generator *>(gen); }

// `torch.randn(sizes, dtype=dtype, device=<the generator's>, generator=gen)` (uniform = 0), or
// `torch.rand(...)` (uniform = 1). dtype is a c10::ScalarType code.
void *dl_generator_draw(void *gen, const int64_t *sizes, size_t ndim, int dtype, int uniform, char **err) {
  return guarded(err, [&]() -> void * {
    auto &g = *static_cast<at::Generator *>(gen);
    auto options = at::TensorOptions().dtype(static_cast<c10::ScalarType>(dtype)).device(g.device());
    at::IntArrayRef shape(sizes, ndim);
    at::Tensor t = uniform ? at::rand(shape, g, options) : at::randn(shape, g, options);
    return new at::Tensor(std::move(t));
  });
}

// Whether libtorch's CUDA backend is linked and registered (it is, when libtorch_cuda.so loaded),
// whether or not a GPU is present.
int dl_cuda_built() { return at::detail::getCUDAHooks().isBuilt() ? 1 : 0; }

// Bytes free for new tensors on CUDA device `index`, as ComfyUI's get_free_memory counts them: what
// the driver reports free (cudaMemGetInfo) plus what libtorch's caching allocator holds reserved but
// not in use, which it hands out again before asking the driver. cudaMemGetInfo is looked up in the
// CUDA runtime libtorch_cuda.so already loaded, so no CUDA headers or version are compiled in.
int dl_cuda_free_memory(int index, uint64_t *free_bytes, uint64_t *total_bytes, char **err) {
  return guarded(err, [&]() -> int {
    TORCH_CHECK(at::detail::getCUDAHooks().isBuilt(), "this libtorch has no CUDA backend");
    const int gpus = at::detail::getCUDAHooks().getNumGPUs();
    TORCH_CHECK(index >= 0 && index < gpus, "no CUDA device ", index, " (", gpus, " present)");
    using MemGetInfo = int (*)(size_t *, size_t *);
    auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
    TORCH_CHECK(mem_get_info != nullptr, "the CUDA runtime's cudaMemGetInfo is not loaded");
    c10::DeviceGuard guard(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index)));
    size_t free = 0, total = 0;
    const int status = mem_get_info(&free, &total);
    TORCH_CHECK(status == 0, "cudaMemGetInfo failed with CUDA error ", status);
    uint64_t cached = 0;
#ifdef DL_DEVICE_ALLOCATOR
    const auto stats = c10::getDeviceAllocator(c10::kCUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(index));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const int64_t idle = stats.reserved_bytes[all].current - stats.active_bytes[all].current;
    cached = idle > 0 ? static_cast<uint64_t>(idle) : 0;
#endif
    *free_bytes = static_cast<uint64_t>(free) + cached;
    *total_bytes = static_cast<uint64_t>(total);
    return 1;
  });
}

// The libtorch version this binary runs on, e.g. "2.13.0" (compile-time: headers and library match).
char *dl_torch_version() {
  return dup(std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
             std::to_string(TORCH_VERSION_PATCH));
}

// The vector instruction set libtorch's CPU kernels dispatch to on this machine ("AVX2", "AVX512", …).
char *dl_cpu_capability() { return dup(at::get_cpu_capability()); }

}  // extern "C"
