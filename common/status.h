// Status codes: the definition lives in the public header, shared by servers and clients.
#pragma once

#include "ramkv/status.h"
