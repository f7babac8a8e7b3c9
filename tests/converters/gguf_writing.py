"""Test support for the GGUF tests: the gguf package's writing sequence, in one place.

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    write_out(w)
"""

import gguf


def write_out(w: gguf.GGUFWriter) -> None:
    """Write what was added to `w` (header, metadata, tensor data; every part of a split writer) and close
    it, in the order the gguf package requires."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
