// Not part of the public interface: what the Swift implementation of hmm.h calls back into C for.
#ifndef SWIFT_HMM_INTERNAL_H
#define SWIFT_HMM_INTERNAL_H
/// Sets the calling thread's hmm_last_error() message (truncated to 511 bytes).
void chmm_set_error(const char *message);
#endif
