#include "common/thread.h"

#include "common/errors.h"
#include "common/log.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cerrno>

namespace sluice::detail {

void background_thread(const std::string& name) {
  // ERANGE past 15 characters: the name is a nicety, the scheduling is what counts.
  pthread_setname_np(pthread_self(), name.c_str());
  sched_param param{};
  param.sched_priority = 0;
  const int err = pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
  static std::atomic<bool> said{false};
  if (err != 0 && !said.exchange(true))
    log_line("background threads stay SCHED_OTHER (sched_setscheduler SCHED_BATCH: " +
             errno_text(err) + "): a loader thread woken by next() may take the trainer's core");
}

}  // namespace sluice::detail
