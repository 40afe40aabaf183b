#if canImport(Glibc)
import Glibc
#endif

/// A started, joinable host thread (a pthread): what tests, the selftest port and the benchmarks use
/// to run work really concurrently. (Dispatch's pool may run blocked work items one after another on a
/// small machine, which would serialize the very races they force.)
public final class HostThread: @unchecked Sendable {
    private var handle = pthread_t()
    private let body: @Sendable () -> Void

    /// Starts `body` on a new thread.
    public init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let box = Unmanaged.passRetained(self)
        let rc = pthread_create(&handle, nil, { arg in
            let me = Unmanaged<HostThread>.fromOpaque(arg!).takeRetainedValue()
            me.body()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed")
    }

    /// Waits for the thread to finish. Call it once.
    public func join() { pthread_join(handle, nil) }
}
