from model_runtime.kernels import main

main()
