// The extension module fastvl_kernels._C. Each op lives in its own file and registers itself with
// TORCH_LIBRARY_FRAGMENT(fastvl_cpu, m); importing this module runs those registrations, after which
// the ops are reachable as torch.ops.fastvl_cpu.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvl C++ CPU kernels (ops registered under torch.ops.fastvl_cpu)";
}
