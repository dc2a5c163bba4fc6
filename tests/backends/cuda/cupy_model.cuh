// The array and index types a CuPy-generated kernel receives, modelled for the
// kernel checks of tests/backends/test_cuda_kernels.py (CuPy's own headers are
// not needed to compile the kernels' bodies; these give the same interface).
//
// CArray<T, ndim, c_contiguous, use_32bit_indexing>: a strided view; a[idx]
// with idx the multi-index of CIndexer::get(). CIndexer<ndim>: the loop's
// total size, set(i) turns the flat index i into a C-order multi-index.
// CUPY_FOR: the grid-stride loop of CuPy's elementwise kernels.
#pragma once

template <int _ndim, int _use_32bit_indexing = 0>
class CIndexer {
public:
    ptrdiff_t size_;
    ptrdiff_t shape_[_ndim];
    ptrdiff_t index_[_ndim];

    __device__ ptrdiff_t size() const { return size_; }
    __device__ void set(ptrdiff_t i) {
        for (int d = _ndim - 1; d >= 0; --d) {
            index_[d] = i % shape_[d];
            i /= shape_[d];
        }
    }
    __device__ const ptrdiff_t* get() const { return index_; }
};

template <int _use_32bit_indexing>
class CIndexer<0, _use_32bit_indexing> {
public:
    ptrdiff_t size_;
    __device__ ptrdiff_t size() const { return size_; }
    __device__ void set(ptrdiff_t) {}
    __device__ const ptrdiff_t* get() const { return nullptr; }
};

template <typename T, int _ndim, int _c_contiguous = 0, int _use_32bit_indexing = 0>
class CArray {
public:
    T* data_;
    ptrdiff_t size_;
    ptrdiff_t shape_[_ndim];
    ptrdiff_t strides_[_ndim];  // bytes

    __device__ T& operator[](const ptrdiff_t* idx) const {
        char* p = reinterpret_cast<char*>(data_);
        for (int d = 0; d < _ndim; ++d) p += strides_[d] * idx[d];
        return *reinterpret_cast<T*>(p);
    }
};

template <typename T, int _c_contiguous, int _use_32bit_indexing>
class CArray<T, 0, _c_contiguous, _use_32bit_indexing> {
public:
    T* data_;
    ptrdiff_t size_;
    __device__ T& operator[](const ptrdiff_t*) const { return *data_; }
};

#define CUPY_FOR(i, n)                                                      \
    for (ptrdiff_t i = (ptrdiff_t)blockIdx.x * blockDim.x + threadIdx.x;    \
         i < (n); i += (ptrdiff_t)blockDim.x * gridDim.x)
