module ftps-gateway/tests/goftps

go 1.19
