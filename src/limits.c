/* limits.c - the names of the limits of limits.h, made from its one list. */
#include "limits.h"

#define TF_LIMIT_NAME_(n, d) #n,
const char *const tf_limit_names[TF_LIMIT_COUNT] = {TF_LIMITS(TF_LIMIT_NAME_)};
#undef TF_LIMIT_NAME_
