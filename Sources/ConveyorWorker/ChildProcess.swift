import ConveyorCore
import Foundation
import Synchronization

/// posix_spawn on a thread of its own, which then drains the pipes and reaps the child with
/// `waitpid`: no blocking call on Swift's cooperative pool. Cancelling the awaiting task sends
/// SIGTERM to the process group, then SIGKILL after the grace period. When the command exits,
/// anything it left running in its group is killed, so a background child cannot hold the pipes
/// (or the run) open.
package enum ChildProcess {
    package struct Finished: Sendable {
        package var exitCode: Int32?
        package var signal: Int32?
        package var stdout: String
        package var stderr: String
        package var killedByUs: Bool
    }

    package enum Outcome: Sendable {
        case success(Finished)
        case failure(String)
    }

    /// Receives each output line ("stdout" or "stderr") as it is read.
    package typealias LineSink = @Sendable (String, String) -> Void

    final class Handle: Sendable {
        let pid = Atomic<Int32>(0)
        let done = Atomic<Bool>(false)
        let killed = Atomic<Bool>(false)
        let grace: Duration
        init(grace: Duration) { self.grace = grace }

        /// Cancellation: signals the group now, or as soon as it exists.
        func terminate() {
            killed.store(true, ordering: .sequentiallyConsistent)
            let p = pid.load(ordering: .sequentiallyConsistent)
            if p > 0 { signalGroup(p) }
        }

        func spawned(_ p: Int32) {
            pid.store(p, ordering: .sequentiallyConsistent)
            if killed.load(ordering: .sequentiallyConsistent) { signalGroup(p) }
        }

        private func signalGroup(_ p: Int32) {
            guard !done.load(ordering: .acquiring) else { return }
            kill(-p, SIGTERM)
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(grace.inMilliseconds))) { [self] in
                if !done.load(ordering: .acquiring) { kill(-p, SIGKILL) }
            }
        }
    }

    typealias FileActionFD = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    typealias FileActionPath =
        @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32
    /// glibc 2.34+ and 2.29+; Swift's Glibc module does not declare them (they need _GNU_SOURCE).
    static let addCloseFrom: FileActionFD? =
        dlsym(nil, "posix_spawn_file_actions_addclosefrom_np").map { unsafeBitCast($0, to: FileActionFD.self) }
    static let addChdir: FileActionPath? =
        dlsym(nil, "posix_spawn_file_actions_addchdir_np").map { unsafeBitCast($0, to: FileActionPath.self) }

    package static func run(
        argv: [String], environment: [String: String], directory: String, outputLimit: Int, killGrace: Duration,
        log: LineSink? = nil
    ) async -> Outcome {
        let handle = Handle(grace: killGrace)
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<Outcome, Never>) in
                let t = Thread {
                    cont.resume(
                        returning: spawnAndWait(
                            argv: argv, environment: environment, directory: directory,
                            outputLimit: outputLimit, handle: handle, log: log))
                }
                t.name = "conveyor.shell"
                t.start()
            }
        } onCancel: {
            handle.terminate()
        }
    }

    /// Runs on the child's own thread.
    static func spawnAndWait(
        argv: [String], environment: [String: String], directory: String, outputLimit: Int,
        handle: Handle, log: LineSink?
    ) -> Outcome {
        guard let closeFrom = addCloseFrom, let chdir = addChdir else {
            return .failure(
                """
                this C library lacks posix_spawn_file_actions_addclosefrom_np/addchdir_np (glibc 2.34 or later is \
                needed)
                """
            )
        }
        var outPipe: [Int32] = [0, 0]
        var errPipe: [Int32] = [0, 0]
        guard pipe(&outPipe) == 0 else { return .failure("pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&errPipe) == 0 else {
            close(outPipe[0])
            close(outPipe[1])
            return .failure("pipe: \(String(cString: strerror(errno)))")
        }
        // The child closes every descriptor above 2 anyway (closefrom below); CLOEXEC keeps other
        // children spawned meanwhile from inheriting these ends.
        for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attr, 0)
        var all = sigset_t()
        sigfillset(&all)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        _ = closeFrom(&actions, 3)
        _ = chdir(&actions, directory)

        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] =
            environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, cArgs, cEnv)
        close(outPipe[1])
        close(errPipe[1])
        guard rc == 0 else {
            close(outPipe[0])
            close(errPipe[0])
            return .failure("cannot start \(argv[0]) in \(directory): \(String(cString: strerror(rc)))")
        }
        handle.spawned(pid)

        var out = TailBuffer(limit: outputLimit)
        var err = TailBuffer(limit: outputLimit)
        var lines = [
            LineSplitter(stream: "stdout", budget: outputLimit), LineSplitter(stream: "stderr", budget: outputLimit),
        ]
        var fds = [
            pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0),
            pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0),
        ]
        var open = 2
        var buf = [UInt8](repeating: 0, count: 16_384)
        var status: Int32 = 0
        var reaped = false
        while open > 0 {
            let n = poll(&fds, 2, 100)
            if n < 0 && errno != EINTR { break }
            if n == 0 {
                // Quiet pipes: has the command exited while something it started holds them open?
                if waitpid(pid, &status, WNOHANG) == pid {
                    reaped = true
                    handle.done.store(true, ordering: .releasing)
                    kill(-pid, SIGKILL)
                }
                continue
            }
            for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = read(fds[i].fd, &buf, buf.count)
                if n > 0 {
                    if i == 0 { out.append(buf[0..<n]) } else { err.append(buf[0..<n]) }
                    if let log { lines[i].feed(buf[0..<n], log) }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(fds[i].fd)
                    fds[i].fd = -1
                    open -= 1
                }
            }
        }
        for f in fds where f.fd >= 0 { close(f.fd) }
        if let log { for i in 0..<2 { lines[i].flush(log) } }
        if !reaped {
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            handle.done.store(true, ordering: .releasing)
            // Whatever the command left behind in its group goes with it.
            kill(-pid, SIGKILL)
        }
        let exited = status & 0x7f == 0
        return .success(
            Finished(
                exitCode: exited ? (status >> 8) & 0xff : nil, signal: exited ? nil : status & 0x7f,
                stdout: out.string, stderr: err.string, killedByUs: handle.killed.load(ordering: .relaxed)))
    }
}
