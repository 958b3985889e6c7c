/* dtypes.h - Python-free table of every torch dtype a checkpoint can name.
 *
 * One row per dtype: its torch name, the legacy storage class that carries it
 * (v2 storages) if any, its element size, and what numpy calls the arrays we
 * return for it. The module turns `np_name` into a numpy descriptor once. */
#ifndef TORCHFREE_DTYPES_H
#define TORCHFREE_DTYPES_H

#include "common.h"

typedef enum {
    DT_FLOAT64, DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16,
    DT_COMPLEX128, DT_COMPLEX64, DT_COMPLEX32,
    DT_INT64, DT_INT32, DT_INT16, DT_INT8, DT_UINT8, DT_BOOL,
    DT_UINT16, DT_UINT32, DT_UINT64,
    DT_QINT8, DT_QUINT8, DT_QINT32, DT_QUINT4X2, DT_QUINT2X4,
    DT_FLOAT8_E4M3FN, DT_FLOAT8_E5M2, DT_FLOAT8_E4M3FNUZ, DT_FLOAT8_E5M2FNUZ, DT_FLOAT8_E8M0FNU,
    DT_FLOAT4_E2M1FN_X2,
    DT_BITS8, DT_BITS16, DT_BITS1X8, DT_BITS2X4, DT_BITS4X2,
    DT_UINT1, DT_UINT2, DT_UINT3, DT_UINT4, DT_UINT5, DT_UINT6, DT_UINT7,
    DT_INT1, DT_INT2, DT_INT3, DT_INT4, DT_INT5, DT_INT6, DT_INT7,
    DT_COUNT
} DtypeId;

#define DT_NONE ((DtypeId)-1)

/* Flags of a dtype row. */
enum {
    DTF_VALUE_IS_NUMPY = 1, /* a dtype GLOBAL of this kind becomes the numpy dtype itself */
    DTF_COMPLEX = 2,        /* byte swap per half */
    DTF_QUANTIZED = 4,      /* only valid through _rebuild_qtensor */
    DTF_NO_TENSOR = 8,      /* cannot be saved as a plain tensor (uintN/intN) */
};

typedef struct {
    const char *name;         /* torch name: "float32" (the GLOBAL is `torch float32`) */
    const char *storage;      /* legacy storage class "FloatStorage", or NULL (v3 dtype) */
    uint8_t itemsize;         /* torch element_size() */
    const char *np_name;      /* numpy/ml_dtypes name of the arrays we return */
    uint8_t np_itemsize;      /* itemsize of np_name (complex32 is viewed as float16 pairs) */
    uint8_t flags;
} DtypeInfo;

extern const DtypeInfo dtypes_table[DT_COUNT];

/* Look up by torch name ("float32") or legacy storage class ("FloatStorage"). */
DtypeId dtypes_by_name(const char *name, size_t len);
DtypeId dtypes_by_storage(const char *name, size_t len);

/* Reverse the bytes of each unit of `unit` bytes in place (unit 2, 4 or 8). */
void dtypes_byteswap(uint8_t *data, uint64_t nbytes, unsigned unit);

#endif
