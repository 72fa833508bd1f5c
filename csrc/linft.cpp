// Registration of the linft ops and the stub Python module linft._C.
//
// The module carries no Python bindings: importing it loads this library, whose static
// initialisers register the ops with the dispatcher (TORCH_LIBRARY), so they are reachable as
// torch.ops.linft.* and work with torch.compile and torch.library.opcheck (the layout of
// pytorch/extension-cpp, built with py_limited_api).
#include <Python.h>
#include <torch/library.h>

#include "linft.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // docstring
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(linft, m) {
  m.def("symm_matmul(Tensor A, Tensor X, int tile=256) -> Tensor");
  m.def("orthonormalize(Tensor W, Tensor V, float drop_tol) -> Tensor");
  m.def("rayleigh_ritz(Tensor V, Tensor AV, int k, bool largest) -> (Tensor, Tensor, Tensor, Tensor)");
}
