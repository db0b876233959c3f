// The plugin's own entry points: its ABI version, error strings and the devices its CUDA runtime sees.
#include "vc_common.cuh"

extern "C" {

int vc_cuda_abi(void) { return 2; }

const char *vc_cuda_error_string(int code)
{
    if (code == vc::BAD_GEOMETRY)
        return "a geometry this kernel cannot take (channels divisible by groups, a non-empty output, at most "
               "2^31 - 1 output tiles per plane and weights)";
    if (code == vc::BAD_DTYPE)
        return "dtype must be float32 (0) or float64 (1)";
    if (code == vc::BAD_ARGUMENT)
        return "an argument out of the range this kernel takes";
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int vc_cuda_device_count(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // extern "C"
