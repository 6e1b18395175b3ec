// Cost counting in the emulation (fusedres._cost.count(): tests and bench only). Per kernel
// launch: the kernel, its grid and block, the bytes of global memory its load and store
// instructions move (requests) and their number (accesses), and the distinct bytes they read
// and write (each byte once, however often it is touched: the DRAM traffic of a kernel whose
// repeated reads hit the cache, which the per-channel parameters every thread reads do on a
// GPU).
//
// Exact by construction: every global-memory access of csrc/cuda goes through the helpers of
// utils.cuh (load, store, load_vec, store_vec), which announce it here (begin_access /
// end_access, cuda_runtime.h) with its address and size while counting is on. Strict counting
// (the tests) proves that nothing bypasses them: for the launch, every tensor's pages are made
// inaccessible; begin_access opens the pages of the one access it announces and end_access
// closes them again, so any other access to a tensor faults, and the launch fails naming the
// kernel (runtime.cpp). Tensors allocated while guard_allocations(True) is off are not covered.
#include "cost.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fusedres::emulation {

bool counting = false;

namespace {

// Distinct bytes, one bit each, in 4 KiB pages.
class ByteSet {
 public:
  void add(uintptr_t address, size_t bytes) {
    for (uintptr_t a = address; a < address + bytes; ++a) {
      const uintptr_t page = a >> 12;
      if (page != last_page_) {
        last_ = &pages_[page];  // (references to map elements survive rehashing)
        last_page_ = page;
      }
      const unsigned offset = a & 4095;
      (*last_)[offset >> 6] |= uint64_t(1) << (offset & 63);
    }
  }
  uint64_t count() const {
    uint64_t n = 0;
    for (const auto& [page, bits] : pages_)
      for (uint64_t word : bits) n += __builtin_popcountll(word);
    return n;
  }
  void clear() {
    pages_.clear();
    last_page_ = ~uintptr_t(0);
    last_ = nullptr;
  }

 private:
  std::unordered_map<uintptr_t, std::array<uint64_t, 64>> pages_;
  uintptr_t last_page_ = ~uintptr_t(0);
  std::array<uint64_t, 64>* last_ = nullptr;
};

struct LaunchCost {
  std::string kernel;
  dim3 grid, block;
  size_t shared_bytes = 0;
  uint64_t read_requests = 0, write_requests = 0;  // bytes the load / store instructions move
  uint64_t read_accesses = 0, write_accesses = 0;  // the load / store instructions
  std::array<uint64_t, 5> accesses_by_size{};      // of 1, 2, 4, 8, 16 bytes (reads, writes)
  uint64_t read_bytes = 0, write_bytes = 0;        // distinct bytes read / written
};

// The launch running on this OS thread.
struct Current {
  bool active = false;
  LaunchCost cost;
  ByteSet read, written;
  // Strict counting: the tensors made inaccessible (sorted by base), the pages one access opened.
  std::vector<TensorMapping> closed;
  char* open_begin = nullptr;
  size_t open_length = 0;
};
thread_local Current current;

std::mutex records_mutex;
std::vector<LaunchCost> records;  // completed launches since cost_start
bool strict = false;

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

// The mapping holding `address`, or nullptr.
const TensorMapping* find_mapping(const std::vector<TensorMapping>& mappings, const void* address) {
  const char* a = static_cast<const char*>(address);
  auto it = std::upper_bound(mappings.begin(), mappings.end(), a,
                             [](const char* x, const TensorMapping& m) { return x < m.base; });
  if (it == mappings.begin()) return nullptr;
  --it;
  return a < it->base + it->length ? &*it : nullptr;
}

bool inside_tensor(const TensorMapping* m, const char* begin, size_t bytes) {
  return m != nullptr && begin >= m->data && begin + bytes <= m->data + m->bytes;
}

}  // namespace

void begin_access(const void* p, size_t bytes, bool write) {
  Current& c = current;
  if (!c.active) return;
  size_t size_index = 0;
  while (size_index < 4 && (size_t(1) << size_index) < bytes) ++size_index;
  ++c.cost.accesses_by_size[size_index];
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (write) {
    c.cost.write_requests += bytes;
    ++c.cost.write_accesses;
    c.written.add(address, bytes);
  } else {
    c.cost.read_requests += bytes;
    ++c.cost.read_accesses;
    c.read.add(address, bytes);
  }
  if (!strict) return;
  // Only a tensor's own bytes are opened: an access past its end (or before its start) still
  // faults as out of bounds.
  if (!inside_tensor(find_mapping(c.closed, p), static_cast<const char*>(p), bytes)) return;
  const size_t page = page_size();
  const uintptr_t begin = address / page * page;
  const uintptr_t end = (address + bytes + page - 1) / page * page;
  c.open_begin = reinterpret_cast<char*>(begin);
  c.open_length = end - begin;
  TORCH_CHECK(mprotect(c.open_begin, c.open_length, PROT_READ | PROT_WRITE) == 0,
              "strict cost counting: mprotect failed");
}

void end_access() {
  Current& c = current;
  if (c.open_begin == nullptr) return;
  TORCH_CHECK(mprotect(c.open_begin, c.open_length, PROT_NONE) == 0,
              "strict cost counting: mprotect failed");
  c.open_begin = nullptr;
}

void cost_launch_begin(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
  if (!counting) return;
  Current& c = current;
  c.active = true;
  c.cost = LaunchCost{kernel, grid, block, shared_bytes};
  c.read.clear();
  c.written.clear();
  c.open_begin = nullptr;
  if (!strict) return;
  c.closed = guarded_tensor_mappings();
  std::sort(c.closed.begin(), c.closed.end(),
            [](const TensorMapping& a, const TensorMapping& b) { return a.base < b.base; });
  for (const TensorMapping& m : c.closed)
    TORCH_CHECK(mprotect(m.base, m.length, PROT_NONE) == 0,
                "strict cost counting: mprotect failed");
}

void cost_launch_end(bool completed) {
  Current& c = current;
  if (!c.active) return;
  c.active = false;
  for (const TensorMapping& m : c.closed) mprotect(m.base, m.length, PROT_READ | PROT_WRITE);
  c.closed.clear();
  c.open_begin = nullptr;
  if (!completed) return;
  c.cost.read_bytes = c.read.count();
  c.cost.write_bytes = c.written.count();
  c.read.clear();
  c.written.clear();
  std::lock_guard<std::mutex> lock(records_mutex);
  records.push_back(std::move(c.cost));
}

bool uncounted_access(const void* address) {
  const Current& c = current;
  if (!c.active || !strict) return false;
  return inside_tensor(find_mapping(c.closed, address), static_cast<const char*>(address), 1);
}

PyObject* py_cost_start(PyObject*, PyObject* strict_arg) {
  const bool want_strict = PyObject_IsTrue(strict_arg);
  if (counting) {
    PyErr_SetString(PyExc_RuntimeError, "fusedres: emulated cost counting is already on");
    return nullptr;
  }
  if (want_strict && !allocations_guarded()) {
    PyErr_SetString(PyExc_RuntimeError,
                    "fusedres: strict cost counting needs guard_allocations(True) first (and the "
                    "tensors allocated after it)");
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(records_mutex);
    records.clear();
  }
  strict = want_strict;
  counting = true;
  Py_RETURN_NONE;
}

PyObject* py_cost_stop(PyObject*, PyObject*) {
  counting = false;
  strict = false;
  std::vector<LaunchCost> done;
  {
    std::lock_guard<std::mutex> lock(records_mutex);
    done.swap(records);
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(done.size()));
  for (size_t i = 0; i < done.size(); ++i) {
    const LaunchCost& r = done[i];
    PyObject* item =
        Py_BuildValue("{s:s,s:(III),s:(III),s:n,s:K,s:K,s:K,s:K,s:K,s:K,s:(KKKKK)}", "kernel",
                      r.kernel.c_str(), "grid", r.grid.x, r.grid.y, r.grid.z, "block", r.block.x,
                      r.block.y, r.block.z, "shared_bytes", static_cast<Py_ssize_t>(r.shared_bytes),
                      "read_bytes", static_cast<unsigned long long>(r.read_bytes), "write_bytes",
                      static_cast<unsigned long long>(r.write_bytes), "read_requests",
                      static_cast<unsigned long long>(r.read_requests), "write_requests",
                      static_cast<unsigned long long>(r.write_requests), "read_accesses",
                      static_cast<unsigned long long>(r.read_accesses), "write_accesses",
                      static_cast<unsigned long long>(r.write_accesses), "accesses_by_size",
                      static_cast<unsigned long long>(r.accesses_by_size[0]),
                      static_cast<unsigned long long>(r.accesses_by_size[1]),
                      static_cast<unsigned long long>(r.accesses_by_size[2]),
                      static_cast<unsigned long long>(r.accesses_by_size[3]),
                      static_cast<unsigned long long>(r.accesses_by_size[4]));
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

}  // namespace fusedres::emulation
