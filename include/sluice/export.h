#pragma once

// Symbols marked SLUICE_EXPORT form libsluice.so's ABI; everything else is hidden
// (-fvisibility=hidden). Exception types must be exported so `catch` works across the
// library boundary.
#define SLUICE_EXPORT __attribute__((visibility("default")))
