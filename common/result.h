// Result<T>: the definition lives in the public header, shared by servers and clients.
#pragma once

#include "common/assert.h"
#include "ramkv/result.h"
