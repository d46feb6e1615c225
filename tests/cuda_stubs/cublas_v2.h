// Declarations for the compile check of vptq_ops.cpp (Makefile ops-compile) where the CUDA
// toolkit has only nvcc and the runtime: torch's CUDA headers include this header of a CUDA
// library, for its handle and status types. Found after the real header (-idirafter).
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
