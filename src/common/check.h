#pragma once

// Internal invariants. A failed SLUICE_CHECK is a bug in sluice, not a user error: it prints
// "[internal] file:line: condition" and aborts. User errors throw sluice::Error instead.

#include <cstdio>
#include <cstdlib>

#define SLUICE_CHECK(cond)                                                                     \
  do {                                                                                         \
    if (!(cond)) [[unlikely]] {                                                                \
      std::fprintf(stderr, "[internal] %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)
