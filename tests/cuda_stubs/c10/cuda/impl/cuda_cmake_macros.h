// For the compile check of vptq_ops.cpp (Makefile ops-compile): the CPU wheel of torch ships
// its CUDA headers without this generated one (empty: the build-time switches stay off).
#pragma once
