/*
 * Preloaded in front of libfaketime for the fault suite's clock-skew scenario (12).
 *
 * libfaketime 0.9.10 (Debian's) rewrites every absolute timerfd_settime deadline by the fake
 * offset, even on a CLOCK_MONOTONIC timer with FAKETIME_DONT_FAKE_MONOTONIC=1: timerfd_settime
 * does not say which clock a timer uses (libfaketime issue #378). libdispatch, which runs Swift's
 * timers on Linux, arms CLOCK_MONOTONIC timerfds, so 10 minutes behind made every sleep 10
 * minutes longer and the dispatcher hung at start-up (and 10 minutes ahead fired them early).
 * A real clock step never moves the monotonic clock, so these two calls go straight to the
 * kernel; libfaketime still fakes what the process reads from the wall clock.
 */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

int timerfd_settime(int fd, int flags, const struct itimerspec *value, struct itimerspec *old) {
    return (int)syscall(SYS_timerfd_settime, fd, flags, value, old);
}

int timerfd_gettime(int fd, struct itimerspec *current) {
    return (int)syscall(SYS_timerfd_gettime, fd, current);
}
