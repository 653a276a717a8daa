// Stopping a server process on SIGTERM or SIGINT: the one copy of the signal handling
// that ramkv-coordinator and ramkv-server share.
//
// install_stop_signals() routes both signals to a handler that records the request and
// calls stop() on the current target (set with stop_on_signal); SIGPIPE is ignored (the
// transport sends with MSG_NOSIGNAL; this guards any other write). The target's stop()
// must be async-signal-safe, as ServerTransport::stop() is (transport.h).
//
// Threads: any. One target type per process (the handler pairs the target with the last
// stopper stored); clear the target (nullptr) before the target is destroyed.
#pragma once

#include <atomic>
#include <csignal>

namespace ramkv {

namespace stop_signals_detail {
inline std::atomic<bool> requested{false};
inline std::atomic<void (*)(void*)> stopper{nullptr};
inline std::atomic<void*> target{nullptr};

inline void on_signal(int) {
  requested.store(true);
  // The target is stored after its stopper, so a non-null target has a stopper.
  if (void* t = target.load()) stopper.load()(t);
}
}  // namespace stop_signals_detail

inline void install_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = stop_signals_detail::on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
}

// From now on a signal calls target->stop(); nullptr: no target (a signal is only noted).
template <typename T>
void stop_on_signal(T* target) {
  if (target == nullptr) {
    stop_signals_detail::target.store(nullptr);
    return;
  }
  stop_signals_detail::stopper.store([](void* p) { static_cast<T*>(p)->stop(); });
  stop_signals_detail::target.store(target);
}

// Whether SIGTERM or SIGINT has come since install_stop_signals().
inline bool stop_requested() { return stop_signals_detail::requested.load(); }

}  // namespace ramkv
