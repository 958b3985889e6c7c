/* dtypes.c - the dtype table (see dtypes.h and spec §6). */
#include "dtypes.h"

#define V DTF_VALUE_IS_NUMPY
const DtypeInfo dtypes_table[DT_COUNT] = {
    [DT_FLOAT64] = {"float64", "DoubleStorage", 8, "float64", 8, V},
    [DT_FLOAT32] = {"float32", "FloatStorage", 4, "float32", 4, V},
    [DT_FLOAT16] = {"float16", "HalfStorage", 2, "float16", 2, V},
    [DT_BFLOAT16] = {"bfloat16", "BFloat16Storage", 2, "bfloat16", 2, V},
    [DT_COMPLEX128] = {"complex128", "ComplexDoubleStorage", 16, "complex128", 16, V | DTF_COMPLEX},
    [DT_COMPLEX64] = {"complex64", "ComplexFloatStorage", 8, "complex64", 8, V | DTF_COMPLEX},
    [DT_COMPLEX32] = {"complex32", NULL, 4, "float16", 2, DTF_COMPLEX},
    [DT_INT64] = {"int64", "LongStorage", 8, "int64", 8, V},
    [DT_INT32] = {"int32", "IntStorage", 4, "int32", 4, V},
    [DT_INT16] = {"int16", "ShortStorage", 2, "int16", 2, V},
    [DT_INT8] = {"int8", "CharStorage", 1, "int8", 1, V},
    [DT_UINT8] = {"uint8", "ByteStorage", 1, "uint8", 1, V},
    [DT_BOOL] = {"bool", "BoolStorage", 1, "bool", 1, V},
    [DT_UINT16] = {"uint16", NULL, 2, "uint16", 2, V},
    [DT_UINT32] = {"uint32", NULL, 4, "uint32", 4, V},
    [DT_UINT64] = {"uint64", NULL, 8, "uint64", 8, V},
    [DT_QINT8] = {"qint8", "QInt8Storage", 1, "int8", 1, DTF_QUANTIZED},
    [DT_QUINT8] = {"quint8", "QUInt8Storage", 1, "uint8", 1, DTF_QUANTIZED},
    [DT_QINT32] = {"qint32", "QInt32Storage", 4, "int32", 4, DTF_QUANTIZED},
    [DT_QUINT4X2] = {"quint4x2", "QUInt4x2Storage", 1, "uint8", 1, DTF_QUANTIZED},
    [DT_QUINT2X4] = {"quint2x4", "QUInt2x4Storage", 1, "uint8", 1, DTF_QUANTIZED},
    [DT_FLOAT8_E4M3FN] = {"float8_e4m3fn", NULL, 1, "float8_e4m3fn", 1, V},
    [DT_FLOAT8_E5M2] = {"float8_e5m2", NULL, 1, "float8_e5m2", 1, V},
    [DT_FLOAT8_E4M3FNUZ] = {"float8_e4m3fnuz", NULL, 1, "float8_e4m3fnuz", 1, V},
    [DT_FLOAT8_E5M2FNUZ] = {"float8_e5m2fnuz", NULL, 1, "float8_e5m2fnuz", 1, V},
    [DT_FLOAT8_E8M0FNU] = {"float8_e8m0fnu", NULL, 1, "float8_e8m0fnu", 1, V},
    [DT_FLOAT4_E2M1FN_X2] = {"float4_e2m1fn_x2", NULL, 1, "uint8", 1, 0},
    [DT_BITS8] = {"bits8", NULL, 1, "uint8", 1, 0},
    [DT_BITS16] = {"bits16", NULL, 2, "uint16", 2, 0},
    [DT_BITS1X8] = {"bits1x8", NULL, 1, "uint8", 1, 0},
    [DT_BITS2X4] = {"bits2x4", NULL, 1, "uint8", 1, 0},
    [DT_BITS4X2] = {"bits4x2", NULL, 1, "uint8", 1, 0},
    [DT_UINT1] = {"uint1", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT2] = {"uint2", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT3] = {"uint3", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT4] = {"uint4", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT5] = {"uint5", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT6] = {"uint6", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_UINT7] = {"uint7", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT1] = {"int1", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT2] = {"int2", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT3] = {"int3", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT4] = {"int4", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT5] = {"int5", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT6] = {"int6", NULL, 1, NULL, 0, DTF_NO_TENSOR},
    [DT_INT7] = {"int7", NULL, 1, NULL, 0, DTF_NO_TENSOR},
};
#undef V

static int eq(const char *a, const char *s, size_t len) {
    return a != NULL && strlen(a) == len && memcmp(a, s, len) == 0;
}

DtypeId dtypes_by_name(const char *name, size_t len) {
    for (int i = 0; i < DT_COUNT; i++)
        if (eq(dtypes_table[i].name, name, len)) return (DtypeId)i;
    return DT_NONE;
}

DtypeId dtypes_by_storage(const char *name, size_t len) {
    for (int i = 0; i < DT_COUNT; i++)
        if (eq(dtypes_table[i].storage, name, len)) return (DtypeId)i;
    return DT_NONE;
}

void dtypes_byteswap(uint8_t *data, uint64_t nbytes, unsigned unit) {
    uint64_t n = nbytes / unit;
    switch (unit) {
    case 2:
        for (uint64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, data + 2 * i, 2);
            v = __builtin_bswap16(v);
            memcpy(data + 2 * i, &v, 2);
        }
        break;
    case 4:
        for (uint64_t i = 0; i < n; i++) {
            uint32_t v;
            memcpy(&v, data + 4 * i, 4);
            v = __builtin_bswap32(v);
            memcpy(data + 4 * i, &v, 4);
        }
        break;
    case 8:
        for (uint64_t i = 0; i < n; i++) {
            uint64_t v;
            memcpy(&v, data + 8 * i, 8);
            v = __builtin_bswap64(v);
            memcpy(data + 8 * i, &v, 8);
        }
        break;
    default:
        break;
    }
}
