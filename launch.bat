@echo off
rem Adapter Studio launcher (Windows), a plain mirror of launch.sh.
rem   launch.bat [app options]          first run: create .venv, install PyTorch + requirements; then start the studio
rem   launch.bat --test [pytest options] run the test suite in the same environment
rem STUDIO_TORCH=cpu^|cu126^|cu128 picks the PyTorch build (default: cu128 when nvidia-smi finds a GPU, else cpu).
setlocal EnableExtensions EnableDelayedExpansion
set "HERE=%~dp0"
if "%HERE:~-1%"=="\" set "HERE=%HERE:~0,-1%"
cd /d "%HERE%"
set "VENV=%HERE%\.venv"
set "TORCH_VERSION=2.13.0"

if not exist "%VENV%\Scripts\python.exe" (
    set "PY=%STUDIO_PYTHON%"
    if "!PY!"=="" (
        where py >nul 2>nul && (set "PY=py -3") || (set "PY=python")
    )
    echo Creating the environment in %VENV% ^(first run only^)...
    !PY! -m venv "%VENV%" || (echo Adapter Studio needs Python 3.10 to 3.13; install it from python.org and run this again. & exit /b 1)
)
set "VPY=%VENV%\Scripts\python.exe"

set "VARIANT=%STUDIO_TORCH%"
if "%VARIANT%"=="" (
    set "VARIANT=cpu"
    where nvidia-smi >nul 2>nul && nvidia-smi -L >nul 2>nul && set "VARIANT=cu128"
)

for /f "usebackq delims=" %%h in (`"%VPY%" -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:16])" "%HERE%\requirements.txt"`) do set "REQHASH=%%h"
set "WANT=torch=%TORCH_VERSION%-%VARIANT% req=%REQHASH%"
set "HAVE="
if exist "%VENV%\.studio-installed" set /p HAVE=<"%VENV%\.studio-installed"
if not "%HAVE%"=="%WANT%" (
    echo Installing PyTorch %TORCH_VERSION% ^(%VARIANT%^) and the studio's requirements...
    "%VPY%" -m pip install --disable-pip-version-check --retries 1 --timeout 30 "torch==%TORCH_VERSION%" --extra-index-url "https://download.pytorch.org/whl/%VARIANT%" || exit /b 1
    "%VPY%" -m pip install --disable-pip-version-check -r "%HERE%\requirements.txt" || exit /b 1
    > "%VENV%\.studio-installed" echo %WANT%
)

if "%~1"=="--test" goto run_tests
"%VPY%" "%HERE%\app.py" %*
exit /b %errorlevel%

:run_tests
for /f "usebackq delims=" %%h in (`"%VPY%" -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:16])" "%HERE%\requirements-dev.txt"`) do set "DEVHASH=%%h"
set "HAVEDEV="
if exist "%VENV%\.studio-dev-installed" set /p HAVEDEV=<"%VENV%\.studio-dev-installed"
if not "%HAVEDEV%"=="%DEVHASH%" (
    "%VPY%" -m pip install --disable-pip-version-check -r "%HERE%\requirements-dev.txt" || exit /b 1
    > "%VENV%\.studio-dev-installed" echo %DEVHASH%
)
set "ARGS="
shift
:collect
if "%~1"=="" goto pytest
set "ARGS=%ARGS% %1"
shift
goto collect
:pytest
"%VPY%" -m pytest %ARGS%
exit /b %errorlevel%
