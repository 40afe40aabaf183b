import HMM
print("hmm")
